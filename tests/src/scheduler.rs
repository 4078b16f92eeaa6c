//! balloon-scheduler as a process beside test VMs.

use crate::error::IoContext;
use crate::lab;
use crate::{LabError, Result};
use scheduler::api::{ApiMessage, ApiReply, ApiRequest, SchedulerStatus, API_VERSION};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct SchedulerProcess {
    pub dir: PathBuf,
    pub api_socket: PathBuf,
    pub trace: PathBuf,
    child: Option<Child>,
}

impl SchedulerProcess {
    /// Starts `balloon-scheduler run` with `config` (TOML without `api_socket`, which is added).
    pub fn start(name: &str, config: &str) -> Result<Self> {
        let dir = lab::run_dir(&format!("{name}-scheduler"))?;
        let api_socket = dir.join("api.sock");
        let trace = dir.join("trace.jsonl");
        let config_path = dir.join("scheduler.toml");
        std::fs::write(
            &config_path,
            format!("api_socket = \"{}\"\n{config}", api_socket.display()),
        )
        .ctx(|| "writing scheduler.toml".into())?;
        let exe = lab::workspace_binary("balloon-scheduler")?;
        let log =
            std::fs::File::create(dir.join("scheduler.log")).ctx(|| "scheduler.log".into())?;
        let log2 = log.try_clone().ctx(|| "scheduler.log".into())?;
        let mut cmd = Command::new(&exe);
        cmd.args(["run", "--config"])
            .arg(&config_path)
            .arg("--trace")
            .arg(&trace)
            .env(
                "RUST_LOG",
                std::env::var("SCHEDULER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        lab::die_with_parent(&mut cmd);
        let child = cmd.spawn().ctx(|| format!("starting {}", exe.display()))?;
        let p = SchedulerProcess {
            dir,
            api_socket,
            trace,
            child: Some(child),
        };
        crate::wait::wait_for(
            "the scheduler's API socket",
            Duration::from_secs(20),
            Duration::from_millis(20),
            || {
                Ok(match p.request(ApiRequest::Status {}) {
                    Ok(_) => crate::wait::Poll::Ready(()),
                    Err(e) => crate::wait::Poll::Pending(e.to_string()),
                })
            },
        )?;
        Ok(p)
    }

    pub fn request(&self, request: ApiRequest) -> Result<ApiReply> {
        let s =
            UnixStream::connect(&self.api_socket).ctx(|| "connecting to the scheduler".into())?;
        let mut w = s.try_clone().ctx(|| "clone".into())?;
        let mut text = serde_json::to_string(&ApiMessage {
            version: API_VERSION,
            request,
        })
        .map_err(|e| LabError::Other(e.to_string()))?;
        text.push('\n');
        w.write_all(text.as_bytes()).ctx(|| "API write".into())?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .ctx(|| "API read".into())?;
        serde_json::from_str(&line).map_err(|e| LabError::Other(format!("bad reply {line:?}: {e}")))
    }

    pub fn status(&self) -> Result<SchedulerStatus> {
        let reply = self.request(ApiRequest::Status {})?;
        reply
            .status
            .ok_or_else(|| LabError::Other(format!("status failed: {:?}", reply.error)))
    }

    /// SIGTERM; returns the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut c = self
            .child
            .take()
            .ok_or_else(|| LabError::Other("scheduler not running".into()))?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().ctx(|| "waiting for the scheduler".into())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("scheduler.log")).unwrap_or_default()
    }
}

impl Drop for SchedulerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "scheduler kept its directory: {}\n--- scheduler.log tail ---\n{}",
                self.dir.display(),
                self.log()
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
