//! Command line and TOML config. Every option can be given in either; the command line wins.

use balloon_protocol::config_file::{self, ConfigFileError};
use balloon_protocol::parse_size;
use clap::Parser;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "vhost-balloon-backend",
    version,
    about = "The virtio-balloon device (virtio id 5) as a vhost-user backend: returns ballooned guest memory to the host"
)]
pub struct Cli {
    /// vhost-user socket to listen on (QEMU: -chardev socket,path=...; cloud-hypervisor:
    /// --generic-vhost-user socket=...).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Connect to --socket as a client instead of listening on it: for a frontend that is the
    /// server (QEMU `-chardev socket,server=on`), which then accepts a restarted backend.
    /// The backend retries until the frontend's socket accepts it.
    #[arg(long)]
    pub client: bool,
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
    #[arg(long, value_parser = parse_size)]
    pub target: Option<u64>,
    /// Start with discarding off: ballooned pages stay allocated on the host. Needed while
    /// something must not see guest memory vanish (VFIO passthrough, postcopy migration,
    /// background snapshots): QEMU's own discard inhibitors do not reach this process.
    #[arg(long)]
    pub no_discard: bool,
    /// Do not offer the statistics queue.
    #[arg(long)]
    pub no_stats: bool,
    /// Do not offer DEFLATE_ON_OOM (then the guest's MemTotal shrinks with the balloon and the
    /// guest does not take pages back under memory pressure).
    #[arg(long)]
    pub no_deflate_on_oom: bool,
    /// Do not offer free page reporting.
    #[arg(long)]
    pub no_free_page_reporting: bool,
    /// TOML file with any of these options (keys as the long options, with underscores).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long)]
    pub log_level: Option<String>,
}

/// The same options as a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub socket: Option<PathBuf>,
    pub client: Option<bool>,
    pub control_socket: Option<PathBuf>,
    pub app_socket: Option<PathBuf>,
    pub state_file: Option<PathBuf>,
    pub socket_group: Option<String>,
    pub app_secret_file: Option<PathBuf>,
    pub stats_interval: Option<u64>,
    pub target: Option<String>,
    pub discard: Option<bool>,
    pub stats: Option<bool>,
    pub deflate_on_oom: Option<bool>,
    pub free_page_reporting: Option<bool>,
    pub log_level: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("config {0}")]
    File(#[from] ConfigFileError),
    #[error("config: {0}")]
    Size(#[from] balloon_protocol::units::SizeError),
    #[error("--socket is required (or `socket` in the config file)")]
    NoSocket,
}

/// Everything the backend needs to run, resolved.
#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
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
        let file: FileConfig = match &self.config {
            Some(path) => config_file::read(path)?,
            None => FileConfig::default(),
        };
        let file_target = file.target.as_deref().map(parse_size).transpose()?;
        Ok(Options {
            socket: self.socket.or(file.socket).ok_or(OptionsError::NoSocket)?,
            client: self.client || file.client.unwrap_or(false),
            control_socket: self.control_socket.or(file.control_socket),
            app_socket: self.app_socket.or(file.app_socket),
            state_file: self.state_file.or(file.state_file),
            socket_group: self.socket_group.or(file.socket_group),
            app_secret_file: self.app_secret_file.or(file.app_secret_file),
            stats_interval: self
                .stats_interval
                .or(file.stats_interval)
                .unwrap_or(DEFAULT_STATS_INTERVAL),
            target: self.target.or(file_target),
            discard: !self.no_discard && file.discard.unwrap_or(true),
            stats: !self.no_stats && file.stats.unwrap_or(true),
            deflate_on_oom: !self.no_deflate_on_oom && file.deflate_on_oom.unwrap_or(true),
            free_page_reporting: !self.no_free_page_reporting
                && file.free_page_reporting.unwrap_or(true),
            log_level: self
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_wins_over_the_file() {
        let dir = std::env::temp_dir().join(format!("opts-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("b.toml");
        std::fs::write(
            &cfg,
            "socket = \"/run/a.sock\"\nstats_interval = 9\ntarget = \"256M\"\ndiscard = false\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "x",
            "--config",
            cfg.to_str().unwrap(),
            "--stats-interval",
            "2",
        ]);
        let o = cli.resolve().unwrap();
        assert_eq!(o.socket, PathBuf::from("/run/a.sock"));
        assert_eq!(o.stats_interval, 2);
        assert_eq!(o.target, Some(256 << 20));
        assert!(!o.discard && o.stats && o.deflate_on_oom);
        std::fs::write(&cfg, "sockett = \"/x\"\n").unwrap();
        let cli = Cli::parse_from(["x", "--config", cfg.to_str().unwrap()]);
        assert!(matches!(
            cli.resolve(),
            Err(OptionsError::File(ConfigFileError::Parse { .. }))
        ));
        assert!(matches!(
            Cli::parse_from(["x"]).resolve(),
            Err(OptionsError::NoSocket)
        ));
        assert!(Cli::try_parse_from(["x", "--target", "12Q"]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let example = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/vhost-balloon-backend.toml"
        );
        let o = Cli::parse_from(["x", "--config", example])
            .resolve()
            .unwrap();
        assert_eq!(o.socket, PathBuf::from("/run/vhost-balloon/vm1.sock"));
        assert_eq!(o.target, Some(0));
        assert!(o.discard && o.free_page_reporting);
    }
}
