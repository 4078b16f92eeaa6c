//! Our vhost-user balloon backend as a process beside a test VM.

use crate::error::IoContext;
use crate::lab;
use crate::vm::VhostUserBalloon;
use crate::wait::{wait_for, Poll};
use crate::{LabError, Result};
use balloon_protocol::{BackendStatus, ControlClient, ControlReply, ControlRequest};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The virtio-serial port the guest app (and its systemd unit) connects to.
pub const APP_PORT: &str = "org.balloon.app";

/// A guest shell command that runs the app on `APP_PORT` with `args` as its systemd unit does
/// (examples/systemd/balloon-guest.service: Restart=on-failure, RestartSec=2), its output
/// appended to /tmp/app.log. A host that dropped the app for silence (a TCG guest starved on a
/// loaded host) refuses its next message, and the app exits with an error to come back with a
/// fresh hello; SIGTERM ends it for good (it exits 0).
pub fn app_as_its_unit(args: &str) -> String {
    format!(
        "until balloon-guest --connect serial:/dev/virtio-ports/{APP_PORT} {args} \
         >> /tmp/app.log 2>&1; do sleep 2; done"
    )
}

pub struct Backend {
    pub dir: PathBuf,
    /// The vhost-user socket the frontend connects to: the backend's own, or the keeper's.
    pub socket: PathBuf,
    /// Behind a keeper: the keeper's backend socket, which the backend connects to.
    pub keeper_backend_socket: Option<PathBuf>,
    pub control_socket: PathBuf,
    pub state_file: PathBuf,
    /// Where the guest app's virtio-serial port connects.
    pub app_socket: PathBuf,
    pub extra_args: Vec<String>,
    child: Option<Child>,
    keeper: Option<Child>,
}

impl Backend {
    /// Starts `vhost-balloon-backend` with its sockets and state file in a fresh directory.
    pub fn start(name: &str, extra_args: &[&str]) -> Result<Backend> {
        Self::start_with_app_socket(name, extra_args, None)
    }

    /// As `start`, with the guest app's socket at `app_socket` (e.g. a hybrid-vsock path).
    pub fn start_with_app_socket(
        name: &str,
        extra_args: &[&str],
        app_socket: Option<PathBuf>,
    ) -> Result<Backend> {
        let mut b = Self::in_new_dir(name, extra_args, app_socket)?;
        b.restart()?;
        Ok(b)
    }

    /// The sockets and state file in a fresh directory; nothing started yet.
    fn in_new_dir(name: &str, extra_args: &[&str], app_socket: Option<PathBuf>) -> Result<Backend> {
        let dir = lab::run_dir(&format!("{name}-backend"))?;
        Ok(Backend {
            socket: dir.join("vhost.sock"),
            keeper_backend_socket: None,
            control_socket: dir.join("control.sock"),
            state_file: dir.join("state.json"),
            app_socket: app_socket.unwrap_or_else(|| dir.join("app.sock")),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            dir,
            child: None,
            keeper: None,
        })
    }

    /// As `start`, behind vhost-user-keeper: the frontend connects to the keeper's socket
    /// (`socket`), the backend to the keeper as a client, so the backend can be killed and
    /// restarted without the frontend seeing its connection close.
    pub fn start_behind_keeper(name: &str, extra_args: &[&str]) -> Result<Backend> {
        let mut b = Self::in_new_dir(name, extra_args, None)?;
        let backend_socket = b.dir.join("keeper-backend.sock");
        let exe = lab::workspace_binary("vhost-user-keeper")?;
        let log = std::fs::File::create(b.dir.join("keeper.log")).ctx(|| "keeper.log".into())?;
        let mut cmd = Command::new(&exe);
        cmd.arg("--socket")
            .arg(&b.socket)
            .arg("--backend-socket")
            .arg(&backend_socket)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().ctx(|| "keeper.log".into())?)
            .stderr(log);
        lab::die_with_parent(&mut cmd);
        b.keeper = Some(cmd.spawn().ctx(|| format!("starting {}", exe.display()))?);
        wait_for_paths("the keeper's sockets", &[&b.socket, &backend_socket])?;
        b.keeper_backend_socket = Some(backend_socket);
        b.restart()?;
        Ok(b)
    }

    /// The keeper's log (empty without a keeper).
    pub fn keeper_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("keeper.log")).unwrap_or_default()
    }

    /// Starts the process again on the same sockets and state file (after `kill`).
    pub fn restart(&mut self) -> Result<()> {
        let exe = lab::workspace_binary("vhost-balloon-backend")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("backend.log"))
            .ctx(|| "creating backend.log".into())?;
        let log2 = log.try_clone().ctx(|| "backend.log".into())?;
        let _ = std::fs::remove_file(&self.control_socket);
        // A killed backend leaves its vhost-user socket: the new one is told apart by inode
        // and change time (a file system may give the new socket the freed inode's number).
        let stale = {
            use std::os::unix::fs::MetadataExt;
            std::fs::symlink_metadata(&self.socket)
                .ok()
                .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
        };
        let mut cmd = Command::new(&exe);
        match &self.keeper_backend_socket {
            Some(keeper) => cmd.arg("--client").arg("--socket").arg(keeper),
            None => cmd.arg("--socket").arg(&self.socket),
        };
        cmd.arg("--control-socket")
            .arg(&self.control_socket)
            .arg("--state-file")
            .arg(&self.state_file)
            .arg("--app-socket")
            .arg(&self.app_socket)
            .args(&self.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("BACKEND_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        lab::die_with_parent(&mut cmd);
        let child = cmd.spawn().ctx(|| format!("starting {}", exe.display()))?;
        self.child = Some(child);
        let control = self.control_socket.clone();
        wait_for(
            "the backend's control socket",
            Duration::from_secs(20),
            Duration::from_millis(20),
            || {
                Ok(match ControlClient::connect(&control) {
                    Ok(_) => Poll::Ready(()),
                    Err(e) => Poll::Pending(e.to_string()),
                })
            },
        )?;
        // The vhost-user socket is bound after the control socket: a frontend (or a signal)
        // that comes between finds no socket yet, or the killed process's stale one. Behind
        // the keeper the backend connects instead.
        if self.keeper_backend_socket.is_none() {
            let socket = self.socket.clone();
            wait_for(
                "the backend's vhost-user socket",
                Duration::from_secs(20),
                Duration::from_millis(10),
                || {
                    use std::os::unix::fs::MetadataExt;
                    let now = std::fs::symlink_metadata(&socket)
                        .ok()
                        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()));
                    Ok(match now {
                        Some(ino) if Some(ino) != stale => Poll::Ready(()),
                        _ => Poll::Pending(format!("{} not bound yet", socket.display())),
                    })
                },
            )?;
        }
        Ok(())
    }

    /// The device as QEMU should attach it.
    pub fn device(&self) -> VhostUserBalloon {
        VhostUserBalloon {
            socket: self.socket.clone(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut c = self
            .child
            .take()
            .ok_or_else(|| LabError::Other("backend not running".into()))?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().ctx(|| "waiting for the backend".into())
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn request(&self, request: ControlRequest) -> Result<ControlReply> {
        let mut c = ControlClient::connect(&self.control_socket)
            .ctx(|| "connecting to the control socket".into())?;
        c.request(request).ctx(|| "control request".into())
    }

    pub fn status(&self) -> Result<BackendStatus> {
        let reply = self.request(ControlRequest::Status {})?;
        reply
            .status
            .ok_or_else(|| LabError::Other(format!("status failed: {:?}", reply.error)))
    }

    pub fn set_target(&self, target_bytes: u64) -> Result<BackendStatus> {
        let reply = self.request(ControlRequest::SetTarget { target_bytes })?;
        reply
            .status
            .ok_or_else(|| LabError::Other(format!("set_target failed: {:?}", reply.error)))
    }

    /// Asks the guest app's balloon for `target_bytes`.
    pub fn set_app_target(&self, target_bytes: u64) -> Result<BackendStatus> {
        let reply = self.request(ControlRequest::SetAppTarget { target_bytes })?;
        reply
            .status
            .ok_or_else(|| LabError::Other(format!("set_app_target failed: {:?}", reply.error)))
    }

    /// The guest app's virtio-serial port wired to this backend's app socket, for
    /// `VmConfig::serial_ports`.
    pub fn app_port(&self) -> (String, PathBuf) {
        (APP_PORT.into(), self.app_socket.clone())
    }

    /// A Debian guest (2 vCPUs) on this backend's device whose balloon-guest unit connects to
    /// this backend at boot.
    pub fn debian_guest_with_app(&self, name: &str) -> crate::VmConfig {
        let mut config = crate::VmConfig::new(name);
        config.image = crate::Image::Debian;
        config.cpus = 2;
        config.vhost_user_balloon = Some(self.device());
        config.serial_ports = vec![self.app_port()];
        config
    }

    /// Sets the app's target to 0 and waits until the app holds nothing.
    pub fn deflate_app(&self) -> Result<BackendStatus> {
        self.set_app_target(0)?;
        self.wait_app("the app to give everything back", |s| {
            s.app.ballooned_bytes == 0 && s.app.held_bytes == 0
        })
    }

    /// Waits (up to 120 s) until the app's part of the status meets `cond`.
    pub fn wait_app(
        &self,
        what: &str,
        cond: impl Fn(&BackendStatus) -> bool,
    ) -> Result<BackendStatus> {
        wait_for(
            what,
            Duration::from_secs(120),
            Duration::from_millis(100),
            || {
                let s = self.status()?;
                Ok(if cond(&s) {
                    Poll::Ready(s)
                } else {
                    Poll::Pending(format!("{:?}", s.app))
                })
            },
        )
    }

    /// Waits until the driver reports `actual` equal to the target.
    pub fn wait_actual(&self, target_bytes: u64, timeout: Duration) -> Result<BackendStatus> {
        wait_for(
            "the balloon's actual to reach the target",
            timeout,
            Duration::from_millis(20),
            || {
                let s = self.status()?;
                Ok(if s.actual_bytes == target_bytes {
                    Poll::Ready(s)
                } else {
                    Poll::Pending(format!(
                        "actual {} MiB, target {} MiB",
                        s.actual_bytes >> 20,
                        s.target_bytes >> 20
                    ))
                })
            },
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("backend.log")).unwrap_or_default()
    }
}

/// Waits until every one of `paths` exists (a daemon has bound its sockets).
fn wait_for_paths(what: &str, paths: &[&std::path::Path]) -> Result<()> {
    wait_for(
        what,
        Duration::from_secs(20),
        Duration::from_millis(20),
        || {
            Ok(match paths.iter().find(|p| !p.exists()) {
                None => Poll::Ready(()),
                Some(missing) => Poll::Pending(format!("{} missing", missing.display())),
            })
        },
    )
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
        if let Some(mut k) = self.keeper.take() {
            let _ = k.kill();
            let _ = k.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "backend kept its directory for inspection: {}\n--- backend.log tail ---\n{}",
                self.dir.display(),
                self.log()
                    .lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            if self.keeper_backend_socket.is_some() {
                eprintln!("--- keeper.log ---\n{}", self.keeper_log());
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// vhost-device-vsock (installed by `scripts/lab.sh vsock`): a vhost-user vsock device with the
/// hybrid-vsock convention, a guest connection to host port P reaching `uds_path`_P.
pub struct VsockDevice {
    pub dir: PathBuf,
    /// The vhost-user socket QEMU connects to.
    pub socket: PathBuf,
    /// The host side: applications listen on `uds_path`_PORT.
    pub uds_path: PathBuf,
    child: Child,
}

impl VsockDevice {
    pub fn start(name: &str) -> Result<Self> {
        let exe = lab::require(
            lab::lab_dir().join("tools/bin/vhost-device-vsock"),
            "vhost-device-vsock",
            "vsock",
        )?;
        let dir = lab::run_dir(&format!("{name}-vsock"))?;
        let socket = dir.join("vhost.sock");
        let uds_path = dir.join("vsock.sock");
        let log = std::fs::File::create(dir.join("vsock.log")).ctx(|| "vsock.log".into())?;
        let mut cmd = Command::new(&exe);
        cmd.arg("--guest-cid")
            .arg("3")
            .arg("--socket")
            .arg(&socket)
            .arg("--uds-path")
            .arg(&uds_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().ctx(|| "vsock.log".into())?)
            .stderr(log);
        lab::die_with_parent(&mut cmd);
        let child = cmd.spawn().ctx(|| format!("starting {}", exe.display()))?;
        wait_for_paths("vhost-device-vsock's socket", &[&socket])?;
        Ok(VsockDevice {
            dir,
            socket,
            uds_path,
            child,
        })
    }

    /// Where a host application listens for guest connections to `port`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds_path.display()))
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
