//! The line protocol between the VM harness and the test agent in the guest: one JSON object per
//! line each way, over a virtio-serial port. Kept here, in one place, for both ends.

use serde::{Deserialize, Serialize};

/// Well-known name of the agent's virtio-serial port (`/dev/virtio-ports/NAME` in the guest).
pub const AGENT_PORT_NAME: &str = "org.balloon.agent";

/// A shell command for the guest to run with `/bin/sh -c`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRequest {
    pub id: u64,
    pub cmd: String,
    /// Start the command and reply at once with its pid; its output goes to /dev/null.
    #[serde(default)]
    pub background: bool,
}

/// The outcome of one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentReply {
    pub id: u64,
    /// Exit code; `None` if killed by a signal or started in the background.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub pid: Option<u32>,
    pub stdout: String,
    pub stderr: String,
    /// Set when the agent could not run the command at all.
    pub error: Option<String>,
}

impl AgentReply {
    /// A reply that carries nothing yet.
    pub fn new(id: u64) -> Self {
        AgentReply {
            id,
            code: None,
            signal: None,
            pid: None,
            stdout: String::new(),
            stderr: String::new(),
            error: None,
        }
    }
}
