//! Command line and TOML config. Every option can be given in either; the command line wins.

use crate::memory::file::MemoryLayout;
use balloon_protocol::config_file::{self, ConfigFileError};
use balloon_protocol::Size;
use clap::Parser;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The options, declared once for the command line and the config file (keys as the long
/// options, with underscores; a switch such as `--no-stats` is `stats = false` there).
#[derive(Debug, Default, Parser, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[command(
    name = "vhost-balloon-backend",
    version,
    about = "The virtio-balloon device (virtio id 5) as a vhost-user backend: returns ballooned guest memory to the host"
)]
pub struct Cli {
    /// vhost-user socket to listen on (QEMU: -chardev socket,path=...; cloud-hypervisor:
    /// --generic-vhost-user socket=...). Optional with --guest-memory-file: then the guest
    /// app alone can balloon a VM that has no vhost-user balloon device.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The VMM's guest RAM file (QEMU `memory-backend-file,mem-path=FILE,share=on`,
    /// cloud-hypervisor `--memory-zone file=FILE,shared=on`), so that the guest app's pages
    /// can be named and returned without a balloon driver in the guest. Opened when an app
    /// connects (the VMM creates it); needs --guest-memory-layout.
    #[arg(long)]
    pub guest_memory_file: Option<PathBuf>,
    /// Where the file's bytes are in guest-physical memory: `q35` or `pc` (QEMU's machines,
    /// without max-ram-below-4g), `cloud-hypervisor` (x86_64, one memory zone), or regions
    /// `GPA:SIZE@OFFSET,...` (e.g. `0:2G@0,4G:2G@2G`). Never guessed: a wrong layout would
    /// discard live guest memory, so a memory table that disagrees with it is refused.
    #[arg(long)]
    pub guest_memory_layout: Option<MemoryLayout>,
    /// Guest RAM in the memory file when the file is larger than the guest's RAM (QEMU uses
    /// the first `size=` bytes of a larger file). Default: the file's size.
    #[arg(long)]
    pub guest_memory_size: Option<Size>,
    /// Connect to --socket as a client instead of listening on it: for a frontend that is the
    /// server (QEMU `-chardev socket,server=on`), which then accepts a restarted backend.
    /// The backend retries until the frontend's socket accepts it.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub client: Option<bool>,
    /// Control socket for the scheduler and operators (JSON lines, mode 0600).
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// Unix socket for the guest app (balloon-guest): QEMU's virtio-serial chardev connects
    /// to it (`-chardev socket,path=...,reconnect-ms=1000` + `virtserialport`).
    #[arg(long)]
    pub app_socket: Option<PathBuf>,
    /// Where the target and settings persist across restarts (written atomically). Beside
    /// it: STATE.lock (one backend per state file) and STATE.pages (the balloon's pages).
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// A group that may connect to the VMM's sockets (--socket, --app-socket: mode 0660),
    /// e.g. the group QEMU runs as under libvirt. Without it they are the owner's only (0600).
    #[arg(long)]
    pub socket_group: Option<String>,
    /// The per-VM secret the guest app must present in its hello (a file of at least 16
    /// bytes, mode 0600). Required whenever the app channel is reachable over vsock, TCP or
    /// a Unix socket in the guest; give the same file to QEMU as
    /// `-fw_cfg name=opt/vhost-balloon/app-secret,file=FILE`.
    #[arg(long)]
    pub app_secret_file: Option<PathBuf>,
    /// Seconds between requests for guest statistics; 0 never asks.
    #[arg(long)]
    pub stats_interval: Option<u64>,
    /// Initial balloon target when no state file holds one (e.g. 512M, 1G).
    #[arg(long)]
    pub target: Option<Size>,
    /// Start with discarding off: ballooned pages stay allocated on the host. Needed while
    /// something must not see guest memory vanish (VFIO passthrough, postcopy migration,
    /// background snapshots): QEMU's own discard inhibitors do not reach this process.
    #[arg(long = "no-discard", num_args = 0, default_missing_value = "false")]
    pub discard: Option<bool>,
    /// Do not offer the statistics queue.
    #[arg(long = "no-stats", num_args = 0, default_missing_value = "false")]
    pub stats: Option<bool>,
    /// Do not offer DEFLATE_ON_OOM (then the guest's MemTotal shrinks with the balloon and the
    /// guest does not take pages back under memory pressure).
    #[arg(
        long = "no-deflate-on-oom",
        num_args = 0,
        default_missing_value = "false"
    )]
    pub deflate_on_oom: Option<bool>,
    /// Do not offer free page reporting.
    #[arg(
        long = "no-free-page-reporting",
        num_args = 0,
        default_missing_value = "false"
    )]
    pub free_page_reporting: Option<bool>,
    /// TOML file with any of these options (keys as the long options, with underscores; a
    /// `--no-X` switch is `X = false`, `--client` is `client = true`).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long)]
    pub log_level: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("config {0}")]
    File(#[from] ConfigFileError),
    #[error(
        "--socket is required (or `socket` in the config file), unless --guest-memory-file \
         and --app-socket are given"
    )]
    NoSocket,
    #[error(
        "--guest-memory-file needs --guest-memory-layout (q35, pc, cloud-hypervisor or regions)"
    )]
    NoLayout,
    #[error("--guest-memory-layout or --guest-memory-size without --guest-memory-file")]
    NoMemoryFile,
}

/// The guest memory file and how to read it.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestMemoryFile {
    pub path: PathBuf,
    pub layout: MemoryLayout,
    pub ram_bytes: Option<u64>,
}

/// Everything the backend needs to run, resolved.
#[derive(Debug, Clone)]
pub struct Options {
    /// None: no VMM connection, the app over the guest memory file only.
    pub socket: Option<PathBuf>,
    pub guest_memory: Option<GuestMemoryFile>,
    pub client: bool,
    pub control_socket: Option<PathBuf>,
    pub app_socket: Option<PathBuf>,
    pub state_file: Option<PathBuf>,
    pub socket_group: Option<String>,
    pub app_secret_file: Option<PathBuf>,
    pub stats_interval: u64,
    pub target: Option<u64>,
    pub discard: bool,
    pub stats: bool,
    pub deflate_on_oom: bool,
    pub free_page_reporting: bool,
    pub log_level: String,
}

pub const DEFAULT_STATS_INTERVAL: u64 = 5;

impl Cli {
    pub fn resolve(self) -> Result<Options, OptionsError> {
        let config = self.config.clone();
        let o = config_file::layered(self, config.as_deref())?;
        let guest_memory = match (o.guest_memory_file, o.guest_memory_layout) {
            (Some(path), Some(layout)) => Some(GuestMemoryFile {
                path,
                layout,
                ram_bytes: o.guest_memory_size.map(|s| s.0),
            }),
            (Some(_), None) => return Err(OptionsError::NoLayout),
            (None, Some(_)) => return Err(OptionsError::NoMemoryFile),
            (None, None) if o.guest_memory_size.is_some() => {
                return Err(OptionsError::NoMemoryFile)
            }
            (None, None) => None,
        };
        if o.socket.is_none() && (guest_memory.is_none() || o.app_socket.is_none()) {
            // Without a VMM connection only the app channel has anything to serve.
            return Err(OptionsError::NoSocket);
        }
        Ok(Options {
            socket: o.socket,
            guest_memory,
            client: o.client.unwrap_or(false),
            control_socket: o.control_socket,
            app_socket: o.app_socket,
            state_file: o.state_file,
            socket_group: o.socket_group,
            app_secret_file: o.app_secret_file,
            stats_interval: o.stats_interval.unwrap_or(DEFAULT_STATS_INTERVAL),
            target: o.target.map(|size| size.0),
            discard: o.discard.unwrap_or(true),
            stats: o.stats.unwrap_or(true),
            deflate_on_oom: o.deflate_on_oom.unwrap_or(true),
            free_page_reporting: o.free_page_reporting.unwrap_or(true),
            log_level: o.log_level.unwrap_or_else(|| "info".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: &[&str]) -> Result<Options, OptionsError> {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .expect("a valid command line")
            .resolve()
    }

    #[test]
    fn command_line_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("b.toml");
        let config = cfg.to_str().unwrap();
        std::fs::write(
            &cfg,
            "socket = \"/run/a.sock\"\nstats_interval = 9\ntarget = \"256M\"\ndiscard = false\n",
        )
        .unwrap();
        let o = resolve(&["--config", config, "--stats-interval", "2"]).unwrap();
        assert_eq!(o.socket, Some(PathBuf::from("/run/a.sock")));
        assert_eq!(o.stats_interval, 2);
        assert_eq!(o.target, Some(256 << 20));
        assert!(!o.discard && o.stats && o.deflate_on_oom);
        std::fs::write(&cfg, "sockett = \"/x\"\n").unwrap();
        assert!(matches!(
            resolve(&["--config", config]),
            Err(OptionsError::File(ConfigFileError::Parse { .. }))
        ));
        assert!(matches!(resolve(&[]), Err(OptionsError::NoSocket)));
        assert!(Cli::try_parse_from(["x", "--target", "12Q"]).is_err());
        let o = resolve(&["--socket", "/s", "--no-stats", "--client"]).unwrap();
        assert!(o.client && !o.stats && o.discard && o.target.is_none());
        std::fs::write(&cfg, "stats = true\ntarget = \"1G\"\n").unwrap();
        let o = resolve(&["--config", config, "--socket", "/s"]).unwrap();
        assert_eq!((o.stats, o.target), (true, Some(1 << 30)));
        let o = resolve(&["--config", config, "--socket", "/s", "--no-stats"]).unwrap();
        assert!(!o.stats, "a switch on the command line wins over the file");
    }

    #[test]
    fn a_guest_memory_file_needs_its_layout_and_makes_the_socket_optional() {
        let o = resolve(&[
            "--guest-memory-file",
            "/dev/shm/vm1.ram",
            "--guest-memory-layout",
            "q35",
            "--app-socket",
            "/run/a.app",
        ])
        .unwrap();
        assert_eq!(o.socket, None);
        assert_eq!(
            o.guest_memory,
            Some(GuestMemoryFile {
                path: PathBuf::from("/dev/shm/vm1.ram"),
                layout: MemoryLayout::Q35,
                ram_bytes: None
            })
        );
        // Nothing to serve: no VMM connection and no app channel.
        assert!(matches!(
            resolve(&["--guest-memory-file", "/f", "--guest-memory-layout", "q35"]),
            Err(OptionsError::NoSocket)
        ));
        assert!(matches!(
            resolve(&["--guest-memory-file", "/dev/shm/vm1.ram"]),
            Err(OptionsError::NoLayout)
        ));
        assert!(matches!(
            resolve(&["--socket", "/s", "--guest-memory-layout", "pc"]),
            Err(OptionsError::NoMemoryFile)
        ));
        assert!(Cli::try_parse_from(["x", "--guest-memory-layout", "q36"]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("b.toml");
        std::fs::write(
            &cfg,
            "guest_memory_file = \"/f\"\nguest_memory_layout = \"0:1G@0,4G:1G@1G\"\n\
             guest_memory_size = \"2G\"\nsocket = \"/s\"\n",
        )
        .unwrap();
        let o = resolve(&["--config", cfg.to_str().unwrap()]).unwrap();
        let m = o.guest_memory.unwrap();
        assert_eq!(
            m.layout.to_string(),
            "0x0:0x40000000@0x0,0x100000000:0x40000000@0x40000000"
        );
        assert_eq!(m.ram_bytes, Some(2 << 30));
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let example = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/vhost-balloon-backend.toml"
        );
        let o = resolve(&["--config", example]).unwrap();
        assert_eq!(o.socket, Some(PathBuf::from("/run/vhost-balloon/vm1.sock")));
        assert_eq!(o.target, Some(0));
        assert!(o.discard && o.free_page_reporting);
    }
}
