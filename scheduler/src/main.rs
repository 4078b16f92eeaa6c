//! balloon-scheduler: the host daemon (`run`) and the policy simulator (`simulate`).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "balloon-scheduler",
    version,
    about = "Decides how much memory every guest gets and moves their balloons"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// The TOML configuration (host budget, policy, guests and their drivers).
        #[arg(long)]
        config: PathBuf,
        /// Append one JSON line per tick (inputs and decisions) to this file.
        #[arg(long)]
        trace: Option<PathBuf>,
    },
    /// Run a scenario against modelled guests in virtual time and print the outcome.
    Simulate {
        scenario: PathBuf,
        /// Override the scenario's policy (static, shares, pressure, mom, proxmox).
        #[arg(long)]
        policy: Option<String>,
        /// Write the trace (JSON lines) here.
        #[arg(long)]
        trace: Option<PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    balloon_protocol::daemon::init_logging(&cli.log_level);
    let result = match cli.command {
        Command::Run { config, trace } => scheduler::run::run(&config, trace),
        Command::Simulate {
            scenario,
            policy,
            trace,
        } => scheduler::run::simulate(&scenario, policy.as_deref(), trace.as_deref()),
    };
    if let Err(e) = result {
        eprintln!("balloon-scheduler: {e}");
        std::process::exit(1);
    }
}
