//! The two commands of `balloon-scheduler`, as library functions (main.rs stays thin).

use crate::config::{Config, DriverConfig};
use crate::daemon::{self, Budget, Guest, Shared};
use crate::drivers::BalloonDriver;
use crate::engine::Engine;
use crate::sim::{self, Scenario};
use signal_hook::iterator::Signals;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Sim(#[from] sim::SimError),
    #[error("{0}")]
    Drivers(#[from] crate::drivers::pool::PoolError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("API socket: {0}")]
    Bind(#[from] balloon_protocol::socket::BindError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Io { what, source }
}

/// Builds a guest's driver from its config.
pub fn connect_driver(config: &DriverConfig, memory_bytes: u64) -> Box<dyn BalloonDriver> {
    crate::drivers::from_config(config, memory_bytes)
}

/// Takes SIGTERM and SIGINT from their default action (ending the process without its clean
/// shutdown) as early as possible; `handle_signals` then acts on them.
fn register_signals() -> Result<Signals, RunError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    Signals::new([SIGTERM, SIGINT]).map_err(io("registering signal handlers"))
}

/// SIGTERM and SIGINT stop the tick loop: a thread of its own waits for them (signal-hook's
/// self-pipe).
fn handle_signals(mut signals: Signals, shared: Arc<Shared>) -> Result<(), RunError> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: stopping after this tick");
                shared.stop.store(true, Ordering::Relaxed);
                shared.ticked.notify_all();
            }
        })
        .map(|_| ())
        .map_err(io("starting the signal thread"))
}

pub fn run(config_path: &Path, trace: Option<PathBuf>) -> Result<(), RunError> {
    let mut config = Config::load(config_path)?;
    let signals = register_signals()?;
    crate::discovery::add_discovered(&mut config)?;
    let guests: Vec<Guest> = config
        .guests
        .iter()
        .map(|g| Guest {
            spec: g.spec(),
            driver: connect_driver(&g.driver, g.memory.0),
        })
        .collect();
    let engine = Engine::new(config.policy.clone(), config.actuator.clone());
    let shared = Shared::new(engine, guests, config.driver_deadline())?;
    handle_signals(signals, shared.clone())?;
    let mut api_path = None;
    if let Some(path) = &config.api_socket {
        // Never over a file or a live scheduler's socket; the owner's only from the start.
        let (listener, socket) =
            balloon_protocol::socket::bind(path, balloon_protocol::socket::Access::OWNER_ONLY)?;
        api_path = Some(socket);
        let s = shared.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || crate::api_server::serve(listener, s))
            .map_err(io("starting the API thread"))?;
        log::info!("API on {}", path.display());
    }
    if let Some(addr) = &config.metrics_listen {
        let listener =
            std::net::TcpListener::bind(addr).map_err(io(format!("metrics address {addr}")))?;
        let s = shared.clone();
        let render: Arc<dyn Fn() -> String + Send + Sync> =
            Arc::new(move || crate::metrics::render(&s.status()));
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || crate::metrics::serve(listener, render))
            .map_err(io("starting the metrics thread"))?;
        log::info!("metrics on http://{addr}/metrics");
    }
    log::info!(
        "{} guests, policy {}, tick {} s, driver deadline {:?}",
        config.guests.len(),
        config.policy.kind,
        config.tick_seconds,
        config.driver_deadline()
    );
    daemon::run_loop(
        shared.clone(),
        config.tick_seconds,
        Budget::from_config(&config),
        trace.map(|p| {
            let max = config
                .trace_max
                .map_or(crate::trace_file::DEFAULT_MAX_BYTES, |s| s.0);
            (p, max)
        }),
    );
    if let Some(socket) = api_path {
        socket.remove();
    }
    log::info!("stopped");
    Ok(())
}

pub fn simulate(path: &Path, policy: Option<&str>, trace: Option<&Path>) -> Result<(), RunError> {
    let mut scenario = Scenario::load(path)?;
    if let Some(p) = policy {
        scenario.policy.kind = p.parse().map_err(RunError::Invalid)?;
    }
    let out = sim::run(&scenario);
    if let Some(t) = trace {
        let mut text = String::new();
        for r in &out.trace {
            text.push_str(&serde_json::to_string(r).unwrap_or_default());
            text.push('\n');
        }
        std::fs::write(t, text).map_err(io(format!("writing {}", t.display())))?;
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&out).map_err(|e| RunError::Invalid(e.to_string()))?
    );
    Ok(())
}
