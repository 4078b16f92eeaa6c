//! balloonctl: the operator's CLI for balloon-scheduler.

use balloon_protocol::parse_size;
use clap::{Parser, Subcommand};
use scheduler::api::{ApiMessage, ApiReply, ApiRequest, API_VERSION};
use scheduler::table::{mib, table};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

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
        default_value = "/run/balloon-scheduler.sock",
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

fn connect(socket: &Path) -> Result<(BufReader<UnixStream>, UnixStream), String> {
    let s = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach balloon-scheduler at {}: {e} (is it running? --socket or BALLOON_SCHEDULER_SOCKET)",
            socket.display()
        )
    })?;
    let w = s.try_clone().map_err(|e| e.to_string())?;
    Ok((BufReader::new(s), w))
}

fn request(socket: &Path, request: ApiRequest) -> Result<ApiReply, String> {
    let (mut r, mut w) = connect(socket)?;
    send(&mut w, request)?;
    read_reply(&mut r)
}

fn send(w: &mut UnixStream, request: ApiRequest) -> Result<(), String> {
    let msg = ApiMessage {
        version: API_VERSION,
        request,
    };
    let mut text = serde_json::to_string(&msg).map_err(|e| e.to_string())?;
    text.push('\n');
    w.write_all(text.as_bytes()).map_err(|e| e.to_string())
}

fn read_reply(r: &mut BufReader<UnixStream>) -> Result<ApiReply, String> {
    let mut line = String::new();
    if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
        return Err("the scheduler closed the connection".into());
    }
    let reply: ApiReply = serde_json::from_str(&line).map_err(|e| format!("bad reply: {e}"))?;
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
            let reply = request(socket, ApiRequest::Status)?;
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
                let reply = request(socket, ApiRequest::PolicyShow)?;
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
            let (mut r, mut w) = connect(socket)?;
            send(&mut w, ApiRequest::Watch)?;
            loop {
                let reply = read_reply(&mut r)?;
                // Clear the screen and redraw, as top does.
                print!("\x1b[2J\x1b[H{}", table(&reply.status.unwrap_or_default()));
                std::io::stdout().flush().map_err(|e| e.to_string())?;
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
