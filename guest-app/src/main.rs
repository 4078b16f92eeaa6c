use balloon_protocol::parse_size;
use clap::Parser;
use guest_app::app::{App, Settings};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "balloon-guest",
    version,
    about = "A user-level memory balloon for Linux guests"
)]
struct Cli {
    /// The channel to the VM's backend: serial:/dev/virtio-ports/NAME, vsock:CID:PORT,
    /// unix:PATH or tcp:HOST:PORT.
    #[arg(long, default_value = "serial:/dev/virtio-ports/org.balloon.app")]
    connect: String,
    /// Lowest inflation rate (per second).
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    min_rate: u64,
    /// Highest inflation rate (per second).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    max_rate: u64,
    /// Added to the rate after each chunk the guest gave without trouble.
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    rate_step: u64,
    /// The rate is divided by this on failure or pressure.
    #[arg(long, default_value_t = 4)]
    rate_divisor: u64,
    /// PSI memory "some avg10" (percent) above which the guest counts as under pressure.
    #[arg(long, default_value_t = 10.0)]
    psi_threshold: f64,
    /// Memory the guest always keeps available; the app never claims into it.
    #[arg(long, default_value = "96M", value_parser = parse_size)]
    reserve: u64,
    /// The per-VM secret to present to the host (required by the host over vsock, TCP or
    /// Unix). Default: the QEMU fw_cfg entry opt/vhost-balloon/app-secret, if the guest has
    /// one (the qemu_fw_cfg module makes it readable by root only).
    #[arg(long)]
    secret_file: Option<std::path::PathBuf>,
    /// Write the reported and current PFN ranges here every second (for checks).
    #[arg(long)]
    pfn_file: Option<std::path::PathBuf>,
    /// Measure how fast physical page numbers resolve: claim SIZE, read its PFNs from
    /// /proc/self/pagemap, print the rate (GiB/s) and exit.
    #[arg(long, value_parser = parse_size)]
    measure_pagemap: Option<u64>,
    /// Log level.
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() {
    let cli = Cli::parse();
    balloon_protocol::daemon::init_logging(&cli.log_level);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let missing = guest_app::caps::missing(guest_app::caps::effective(&status).unwrap_or(0));
    if !missing.is_empty() {
        eprintln!(
            "balloon-guest: missing {} (mlock and pinning need CAP_IPC_LOCK, physical page numbers need CAP_SYS_ADMIN)",
            missing.join(" and ")
        );
        std::process::exit(2);
    }
    if let Some(size) = cli.measure_pagemap {
        match guest_app::chunk::measure_pagemap(size as usize) {
            Ok(gib_s) => {
                println!("{gib_s:.3}");
                return;
            }
            Err(e) => {
                eprintln!("balloon-guest: {e}");
                std::process::exit(1);
            }
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    if let Err(e) = install_signal_handlers(&stop) {
        eprintln!("balloon-guest: signal setup: {e}");
        std::process::exit(1);
    }
    let old_compact = std::fs::read_to_string(guest_app::caps::COMPACT_UNEVICTABLE).ok();
    if let Err(e) = std::fs::write(guest_app::caps::COMPACT_UNEVICTABLE, "0") {
        log::warn!("cannot set {}: {e}", guest_app::caps::COMPACT_UNEVICTABLE);
    }
    let secret = match read_secret(cli.secret_file.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("balloon-guest: {e}");
            std::process::exit(2);
        }
    };
    let settings = Settings {
        secret,
        min_rate: cli.min_rate,
        max_rate: cli.max_rate,
        rate_step: cli.rate_step,
        rate_divisor: cli.rate_divisor,
        psi_threshold: cli.psi_threshold,
        pressure_ticks: 3,
        tick: Duration::from_millis(200),
        max_chunk: 64 << 20,
        pfn_file: cli.pfn_file,
        reserve: cli.reserve,
    };
    let result = guest_app::transport::connect(&cli.connect)
        .map_err(guest_app::app::AppError::Setup)
        .and_then(|stream| App::new(settings, stream))
        .and_then(|mut app| app.run(&stop));
    if let Some(old) = old_compact {
        let _ = std::fs::write(guest_app::caps::COMPACT_UNEVICTABLE, old.trim());
    }
    if let Err(e) = result {
        eprintln!("balloon-guest: {e}");
        std::process::exit(1);
    }
}

/// The secret from `--secret-file`, or from the fw_cfg entry when the guest has one.
fn read_secret(path: Option<&std::path::Path>) -> Result<Option<String>, String> {
    let fw_cfg = std::path::Path::new(balloon_protocol::app::FW_CFG_SECRET_PATH);
    let path = match path {
        Some(p) => p,
        None if fw_cfg.exists() => fw_cfg,
        None => return Ok(None),
    };
    let bytes = std::fs::read(path).map_err(|e| format!("secret file {}: {e}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("secret file {}: not text", path.display()))?;
    Ok(Some(text.trim().to_string()))
}

/// SIGTERM and SIGINT set `stop`; the loop sees it within a tick.
fn install_signal_handlers(stop: &Arc<AtomicBool>) -> std::io::Result<()> {
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    Ok(())
}
