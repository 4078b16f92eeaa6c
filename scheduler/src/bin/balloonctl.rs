//! balloonctl: the operator's CLI for balloon-scheduler.

use balloon_protocol::lines::LineClient;
use balloon_protocol::parse_size;
use clap::{Parser, Subcommand};
use scheduler::api::{ApiMessage, ApiReply, ApiRequest, API_VERSION};
use scheduler::table::{mib, table};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "balloonctl",
    version,
    about = "Control and watch balloon-scheduler"
)]
struct Cli {
    /// The scheduler's API socket.
    #[arg(
        long,
        default_value = "/run/balloon-scheduler/api.sock",
        env = "BALLOON_SCHEDULER_SOCKET"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A table of every guest: memory, target, actual, available, state.
    Status {
        /// Print the raw JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Give GUEST this much memory (e.g. 768M) and pin it there, outside the policy.
    Set { guest: String, size: String },
    /// Keep GUEST at its current size, outside the policy.
    Pin { guest: String },
    /// Hand GUEST back to the policy.
    Unpin { guest: String },
    /// Show the policy, or set its kind: `policy show`, `policy set shares`.
    Policy {
        #[arg(default_value = "show")]
        action: String,
        kind: Option<String>,
    },
    /// A live view, refreshed every tick, with the progress of resizes.
    Watch,
    /// Draw memory per guest over time from a --trace file.
    Plot {
        trace: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
}

/// How long a request may take; a watch waits this long for each status line at most
/// beyond its tick.
const TIMEOUT: Duration = Duration::from_secs(10);

fn connect(socket: &Path, timeout: Duration) -> Result<LineClient, String> {
    LineClient::connect(socket, timeout).map_err(|e| {
        format!(
            "cannot reach balloon-scheduler at {}: {e} (is it running? --socket or BALLOON_SCHEDULER_SOCKET)",
            socket.display()
        )
    })
}

fn request(socket: &Path, request: ApiRequest) -> Result<ApiReply, String> {
    let mut c = connect(socket, TIMEOUT)?;
    let reply = c
        .exchange(&request_line(request)?)
        .map_err(|e| e.to_string())?;
    parse_reply(&reply)
}

fn request_line(request: ApiRequest) -> Result<String, String> {
    let msg = ApiMessage {
        version: API_VERSION,
        request,
    };
    let mut text = serde_json::to_string(&msg).map_err(|e| e.to_string())?;
    text.push('\n');
    Ok(text)
}

fn parse_reply(line: &str) -> Result<ApiReply, String> {
    let reply: ApiReply = serde_json::from_str(line).map_err(|e| format!("bad reply: {e}"))?;
    if reply.ok {
        Ok(reply)
    } else {
        Err(reply.error.unwrap_or_else(|| "error".into()))
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let socket = &cli.socket;
    match cli.command {
        Command::Status { json } => {
            let reply = request(socket, ApiRequest::Status {})?;
            let status = reply.status.unwrap_or_default();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", table(&status));
            }
        }
        Command::Set { guest, size } => {
            let memory_bytes = parse_size(&size).map_err(|e| e.to_string())?;
            request(
                socket,
                ApiRequest::Set {
                    guest: guest.clone(),
                    memory_bytes,
                },
            )?;
            println!("{guest}: pinned at {}", mib(memory_bytes));
        }
        Command::Pin { guest } => {
            request(
                socket,
                ApiRequest::Pin {
                    guest: guest.clone(),
                },
            )?;
            println!("{guest}: pinned");
        }
        Command::Unpin { guest } => {
            request(
                socket,
                ApiRequest::Unpin {
                    guest: guest.clone(),
                },
            )?;
            println!("{guest}: back under the policy");
        }
        Command::Policy { action, kind } => match (action.as_str(), kind) {
            ("show", None) => {
                let reply = request(socket, ApiRequest::PolicyShow {})?;
                let policy = reply.policy.ok_or("the scheduler sent no policy")?;
                let text = toml::to_string(&policy).map_err(|e| e.to_string())?;
                print!("{text}");
            }
            ("set", Some(kind)) => {
                request(socket, ApiRequest::PolicySet { kind: kind.clone() })?;
                println!("policy: {kind}");
            }
            _ => return Err("usage: balloonctl policy [show | set KIND]".into()),
        },
        Command::Watch => {
            // A status line comes every tick; a scheduler silent for a minute is gone.
            let mut c = connect(socket, Duration::from_secs(60))?;
            let first = c
                .exchange(&request_line(ApiRequest::Watch {})?)
                .map_err(|e| e.to_string())?;
            let mut reply = parse_reply(&first)?;
            loop {
                // Clear the screen and redraw, as top does.
                print!("\x1b[2J\x1b[H{}", table(&reply.status.unwrap_or_default()));
                std::io::stdout().flush().map_err(|e| e.to_string())?;
                reply = parse_reply(&c.read_line().map_err(|e| e.to_string())?)?;
            }
        }
        Command::Plot { trace, output } => {
            let records = scheduler::plot::read_trace(&trace).map_err(|e| e.to_string())?;
            scheduler::plot::plot_trace(&records, &output).map_err(|e| e.to_string())?;
            println!("{}", output.display());
        }
    }
    Ok(())
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("balloonctl: {e}");
        std::process::exit(1);
    }
}
