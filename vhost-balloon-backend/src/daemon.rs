//! Wiring: state, control socket, signals, and the vhost-user serve loop (which accepts the
//! frontend again after it disconnects, so QEMU's reconnect-ms and backend restarts work).

use crate::app_channel::AppSecret;
use crate::balloon::{refresh_app_file, Balloon, BalloonError};
use crate::control::{self, ControlHandler};
use crate::device::features::FeatureChoice;
use crate::memory::file::MemoryFile;
use crate::memory::worker::DiscardWorker;
use crate::options::Options;
use crate::state::PersistentState;
use crate::vhu_balloon::{lock, StatsTimer, VhostUserBalloon};
use balloon_protocol::socket::{Access, SocketPath};
use balloon_protocol::{pages_to_bytes, ControlReply, ControlRequest};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    State(#[from] crate::state::StateError),
    #[error("{0}")]
    Balloon(#[from] BalloonError),
    #[error("statistics timer: {0}")]
    Timer(std::io::Error),
    #[error("{0}")]
    Bind(#[from] balloon_protocol::socket::BindError),
    #[error("--socket-group: {0}")]
    Group(std::io::Error),
    #[error("{0}")]
    AppSecret(#[from] crate::app_channel::SecretError),
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    #[error("vhost-user daemon: {0}")]
    Vhost(String),
    #[error("signal setup: {0}")]
    Signals(std::io::Error),
    #[error("starting the discard worker: {0}")]
    Worker(std::io::Error),
    #[error("state file: {0}")]
    StateLock(std::io::Error),
}

/// What the control socket drives: the device state and the statistics timer.
struct Control {
    balloon: Arc<Mutex<Balloon>>,
    stats_timer: Arc<StatsTimer>,
}

impl ControlHandler for Control {
    /// Validates, applies under the device lock, then saves the settings after releasing it
    /// (a slow disk never holds up the vrings or the VMM's config reads). A request that is
    /// refused changes and saves nothing.
    fn handle(&self, request: ControlRequest) -> ControlReply {
        let mut balloon = lock(&self.balloon);
        let result = match request {
            ControlRequest::Status {} => Ok(()),
            ControlRequest::SetTarget { target_bytes } => {
                balloon.set_target(target_bytes).map_err(|e| e.to_string())
            }
            ControlRequest::SetStatsInterval { seconds } => Balloon::check_stats_interval(seconds)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    self.stats_timer
                        .set_interval(seconds)
                        .map_err(|e| format!("statistics timer: {e}"))
                })
                .and_then(|()| {
                    balloon
                        .set_stats_interval(seconds)
                        .map_err(|e| e.to_string())
                }),
            ControlRequest::SetAppTarget { target_bytes } => balloon
                .set_app_target(target_bytes)
                .map_err(|e| e.to_string()),
            ControlRequest::SetDiscard { enabled } => {
                balloon.set_discard(enabled).map_err(|e| e.to_string())
            }
        };
        let save = balloon.unsaved_settings();
        let status = balloon.status();
        drop(balloon);
        let saved = save.map_or(Ok(()), |job| job.run());
        match (result, saved) {
            (Ok(()), Ok(())) => ControlReply::status(status),
            (Ok(()), Err(e)) => ControlReply::error(format!("applied, but {e}")),
            (Err(e), _) => ControlReply::error(e),
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP end the backend cleanly: a thread of its own waits for them
/// (signal-hook's self-pipe) and exits the process after removing the sockets still ours.
fn handle_signals(cleanup: Arc<Mutex<Vec<SocketPath>>>) -> Result<(), DaemonError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(DaemonError::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: shutting down");
                // The state file is written on every change, so nothing is left to save;
                // removing the sockets (those still ours) tells clients the backend is gone.
                for socket in lock_paths(&cleanup).iter() {
                    socket.remove();
                }
                std::process::exit(0);
            }
        })
        .map(|_| ())
        .map_err(DaemonError::Signals)
}

fn lock_paths(paths: &Mutex<Vec<SocketPath>>) -> std::sync::MutexGuard<'_, Vec<SocketPath>> {
    paths.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds one of the backend's sockets (see balloon_protocol::socket: never over a file or a
/// live socket, created with its final mode) and registers it for removal at shutdown.
fn bind_socket(
    path: &std::path::Path,
    access: Access,
    cleanup: &Mutex<Vec<SocketPath>>,
) -> Result<std::os::unix::net::UnixListener, DaemonError> {
    let (listener, socket) =
        balloon_protocol::socket::bind(path, access).map_err(DaemonError::Bind)?;
    lock_paths(cleanup).push(socket);
    Ok(listener)
}

/// Runs the backend until a signal ends it.
pub fn run(options: Options) -> Result<(), DaemonError> {
    let cleanup = Arc::new(Mutex::new(Vec::new()));
    handle_signals(cleanup.clone())?;
    // The VMM's sockets (vhost-user, app channel) may be shared with its group; the control
    // socket is the owner's only.
    let vmm_access = Access {
        group: options
            .socket_group
            .as_deref()
            .map(balloon_protocol::socket::group_id)
            .transpose()
            .map_err(DaemonError::Group)?,
    };
    let app_secret = options
        .app_secret_file
        .as_deref()
        .map(AppSecret::load)
        .transpose()?;

    let choice = FeatureChoice {
        stats: options.stats,
        deflate_on_oom: options.deflate_on_oom,
        free_page_reporting: options.free_page_reporting,
    };
    // Held until the process ends (a kill -9 releases it too).
    let _state_lock = match &options.state_file {
        Some(path) => {
            Some(crate::memory::persist::StateLock::acquire(path).map_err(DaemonError::StateLock)?)
        }
        None => None,
    };
    let worker = DiscardWorker::start().map_err(DaemonError::Worker)?;
    let mut balloon = Balloon::new(choice, options.state_file.clone()).with_discard_worker(worker);
    let saved = match &options.state_file {
        Some(path) => PersistentState::load(path)?,
        None => None,
    };
    match saved {
        Some(state) => {
            log::info!(
                "resuming from the state file: target {} MiB, stats every {} s, discard {}",
                pages_to_bytes(state.target_pages) >> 20,
                state.stats_interval_seconds,
                if state.discard_enabled { "on" } else { "off" }
            );
            balloon.restore(&state);
        }
        None => {
            balloon.set_stats_interval(options.stats_interval)?;
            balloon.set_discard(options.discard)?;
            balloon.set_target(options.target.unwrap_or(0))?;
            if let Some(job) = balloon.unsaved_settings() {
                job.run()?;
            }
        }
    }
    let stats_timer = Arc::new(StatsTimer::new().map_err(DaemonError::Timer)?);
    stats_timer
        .set_interval(balloon.stats_interval_seconds)
        .map_err(DaemonError::Timer)?;
    let balloon = Arc::new(Mutex::new(balloon));
    let memory_file = options.guest_memory.clone().map(|m| {
        let file = Arc::new(Mutex::new(MemoryFile::new(m.path, m.layout, m.ram_bytes)));
        // The VMM may not have created it yet: then the first app to connect opens it.
        match refresh_app_file(&file, &balloon) {
            Ok(()) => {}
            Err(e) => log::info!("{e}: opened when the guest app connects"),
        }
        file
    });

    if let Some(path) = &options.control_socket {
        let listener = bind_socket(path, Access::OWNER_ONLY, &cleanup)?;
        let handler = Arc::new(Control {
            balloon: balloon.clone(),
            stats_timer: stats_timer.clone(),
        });
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control::serve(listener, handler))
            .map_err(DaemonError::Thread)?;
        log::info!("control socket {}", path.display());
    }

    if let Some(path) = &options.app_socket {
        let listener = bind_socket(path, vmm_access, &cleanup)?;
        let b = balloon.clone();
        let file = memory_file.clone();
        if app_secret.is_none() {
            log::warn!(
                "guest app channel without --app-secret-file: safe only behind virtio-serial \
                 (a root-only device in the guest); over vsock any guest user could drive it"
            );
        }
        std::thread::Builder::new()
            .name("app-channel".into())
            .spawn(move || crate::app_channel::serve(listener, b, app_secret, file))
            .map_err(DaemonError::Thread)?;
        log::info!("guest app channel on {}", path.display());
    }

    let Some(socket) = &options.socket else {
        log::info!("no vhost-user socket: serving the guest app over the guest memory file only");
        // The other threads serve; a signal ends the process.
        loop {
            std::thread::park();
        }
    };
    let backend = VhostUserBalloon::new(balloon, stats_timer, memory_file);
    // In client mode the socket is the frontend's (or a keeper's): not ours to create or
    // remove.
    let mut listener = if options.client {
        None
    } else {
        Some(Listener::from(bind_socket(socket, vmm_access, &cleanup)?))
    };
    loop {
        let mut daemon = VhostUserDaemon::new(
            "vhost-balloon".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| DaemonError::Vhost(e.to_string()))?;
        let workers = daemon.get_epoll_handlers();
        for worker in &workers {
            worker
                .register_listener(
                    backend.stats_timer_fd(),
                    EventSet::IN,
                    backend.stats_timer_event(),
                )
                .map_err(DaemonError::Timer)?;
        }
        log::info!("waiting for the frontend on {}", socket.display());
        match listener.as_mut() {
            Some(listener) => {
                if let Err(e) = daemon.start(listener) {
                    log::error!("accepting the frontend failed: {e}");
                    continue;
                }
            }
            None => connect_to_frontend(&mut daemon, socket)?,
        }
        log::info!("frontend connected");
        let result = daemon.wait();
        for worker in &workers {
            worker.send_exit_event();
        }
        backend.disconnected();
        match result {
            Ok(()) => log::info!("frontend disconnected; waiting for it to come back"),
            Err(e) => log::warn!("frontend connection ended: {e}"),
        }
    }
}

/// Client mode: connects to the frontend's socket, retrying while it is not there yet (the
/// frontend starting, or restarting).
fn connect_to_frontend(
    daemon: &mut VhostUserDaemon<VhostUserBalloon>,
    socket: &std::path::Path,
) -> Result<(), DaemonError> {
    let path = socket.to_str().ok_or_else(|| {
        DaemonError::Vhost(format!("socket path {} is not UTF-8", socket.display()))
    })?;
    let mut logged = false;
    loop {
        match daemon.start_client(path) {
            Ok(()) => return Ok(()),
            Err(e) => {
                if !logged {
                    log::info!("frontend socket {path} not accepting yet ({e}); retrying");
                    logged = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}
