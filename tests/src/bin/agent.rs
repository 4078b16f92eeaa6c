//! balloon-test-agent: the guest half of the VM harness. It serves shell commands, one JSON line
//! per request, on a virtio-serial port, so tests can drive a guest without a network or a login.

use balloon_lab::agent_proto::{AgentReply, AgentRequest};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

fn run(req: &AgentRequest) -> AgentReply {
    let mut reply = AgentReply::new(req.id);
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(&req.cmd).stdin(Stdio::null());
    if req.background {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        match cmd.spawn() {
            Ok(mut child) => {
                reply.pid = Some(child.id());
                // Reap it when it ends so no zombie is left behind.
                std::thread::spawn(move || child.wait());
            }
            Err(e) => reply.error = Some(e.to_string()),
        }
        return reply;
    }
    match cmd.output() {
        Ok(out) => {
            reply.code = out.status.code();
            reply.signal = out.status.signal();
            reply.stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            reply.stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        }
        Err(e) => reply.error = Some(e.to_string()),
    }
    reply
}

fn main() {
    let mut args = std::env::args().skip(1);
    let port = match (args.next().as_deref(), args.next()) {
        (Some("--port"), Some(p)) => p,
        _ => {
            eprintln!("usage: balloon-test-agent --port /dev/virtio-ports/NAME");
            std::process::exit(2);
        }
    };
    let file = match OpenOptions::new().read(true).write(true).open(&port) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("balloon-test-agent: cannot open {port}: {e}");
            std::process::exit(1);
        }
    };
    let mut writer = match file.try_clone() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("balloon-test-agent: {e}");
            std::process::exit(1);
        }
    };
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            // No host connected (or it went away): virtio-serial reads return EOF until a host
            // opens the port again.
            Ok(0) => std::thread::sleep(Duration::from_millis(50)),
            Ok(_) => {
                let reply = match serde_json::from_str::<AgentRequest>(line.trim()) {
                    Ok(req) => run(&req),
                    Err(e) => AgentReply {
                        error: Some(format!("bad request: {e}")),
                        ..AgentReply::new(0)
                    },
                };
                let Ok(mut text) = serde_json::to_string(&reply) else {
                    continue;
                };
                text.push('\n');
                if let Err(e) = writer.write_all(text.as_bytes()) {
                    eprintln!("balloon-test-agent: write: {e}");
                }
            }
            Err(e) => {
                eprintln!("balloon-test-agent: read: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
