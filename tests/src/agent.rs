//! The host half of the test agent: runs shell commands in the guest over virtio-serial.

use crate::agent_proto::{AgentReply, AgentRequest};
use crate::error::IoContext;
use crate::{LabError, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Agent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

/// A finished guest command.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl GuestOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl Agent {
    /// Connects to the host end of the agent's port (a QEMU chardev socket in server mode).
    pub fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .ctx(|| format!("connecting to the agent socket {}", path.display()))?;
        let writer = stream.try_clone().ctx(|| "agent socket clone".into())?;
        Ok(Agent {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
        })
    }

    fn request(&mut self, cmd: &str, background: bool, timeout: Duration) -> Result<AgentReply> {
        let id = self.next_id;
        self.next_id += 1;
        let mut text = serde_json::to_string(&AgentRequest {
            id,
            cmd: cmd.to_string(),
            background,
        })
        .map_err(|e| LabError::Agent(e.to_string()))?;
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .ctx(|| "writing to the agent".into())?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LabError::Timeout {
                    what: format!("guest command `{cmd}`"),
                    secs: timeout.as_secs_f64(),
                    last: String::new(),
                });
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .ctx(|| "agent read timeout".into())?;
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(LabError::Agent("the agent socket closed".into())),
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    continue
                }
                Err(e) => return Err(LabError::Agent(format!("reading: {e}"))),
            }
            let reply: AgentReply = serde_json::from_str(line.trim())
                .map_err(|e| LabError::Agent(format!("bad reply {line:?}: {e}")))?;
            // A reply to an earlier request that timed out on our side: not ours.
            if reply.id != id {
                continue;
            }
            if let Some(err) = reply.error {
                return Err(LabError::Agent(format!("`{cmd}`: {err}")));
            }
            return Ok(reply);
        }
    }

    /// Runs `cmd` with `/bin/sh -c` in the guest and returns its output, whatever its status.
    pub fn run_timeout(&mut self, cmd: &str, timeout: Duration) -> Result<GuestOutput> {
        let reply = self.request(cmd, false, timeout)?;
        Ok(GuestOutput {
            code: reply.code,
            stdout: reply.stdout,
            stderr: reply.stderr,
        })
    }

    pub fn run(&mut self, cmd: &str) -> Result<GuestOutput> {
        self.run_timeout(cmd, Duration::from_secs(120))
    }

    /// Runs `cmd` and returns its stdout; a non-zero exit is an error carrying stderr.
    pub fn sh(&mut self, cmd: &str) -> Result<String> {
        let out = self.run(cmd)?;
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(LabError::GuestCommand {
                cmd: cmd.to_string(),
                status: format!("{:?}", out.code),
                stderr: out.stderr,
            })
        }
    }

    /// Starts `cmd` in the background in the guest and returns its pid.
    pub fn spawn(&mut self, cmd: &str) -> Result<u32> {
        let reply = self.request(cmd, true, Duration::from_secs(30))?;
        reply
            .pid
            .ok_or_else(|| LabError::Agent(format!("`{cmd}` started without a pid")))
    }

    /// The guest's /proc/meminfo, in bytes.
    pub fn meminfo(&mut self) -> Result<std::collections::BTreeMap<String, u64>> {
        Ok(crate::host::parse_meminfo(&self.sh("cat /proc/meminfo")?))
    }

    /// How many times the guest kernel's OOM killer has run, from its log.
    pub fn oom_kills(&mut self) -> Result<usize> {
        let log = self.sh("dmesg")?;
        Ok(log
            .lines()
            .filter(|l| l.contains("Out of memory: Killed process"))
            .count())
    }
}
