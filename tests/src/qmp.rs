//! A small QMP client: enough to drive QEMU's built-in balloon and query the VM.

use crate::error::IoContext;
use crate::{LabError, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Asynchronous events received while waiting for replies, oldest first.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects to a QMP socket, reads the greeting and enters command mode.
    pub fn connect(path: &Path) -> Result<Self> {
        let stream =
            UnixStream::connect(path).ctx(|| format!("connecting to QMP at {}", path.display()))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .ctx(|| "QMP read timeout".into())?;
        let writer = stream.try_clone().ctx(|| "QMP socket clone".into())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(LabError::Qmp(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .ctx(|| "reading from QMP".into())?;
        if n == 0 {
            return Err(LabError::Qmp("QEMU closed the QMP socket".into()));
        }
        serde_json::from_str(&line).map_err(|e| LabError::Qmp(format!("bad JSON {line:?}: {e}")))
    }

    /// Runs a command and returns its `return` value; a QMP error becomes `LabError::Qmp`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let mut request = json!({ "execute": command });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut text = request.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .ctx(|| format!("sending QMP {command}"))?;
        loop {
            let msg = self.read_message()?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                return Err(LabError::Qmp(format!("{command}: {err}")));
            }
            if msg.get("event").is_some() {
                self.events.push(msg);
            }
        }
    }

    /// QEMU's built-in balloon: asks for a new guest memory size (`balloon` command).
    pub fn balloon(&mut self, target_bytes: u64) -> Result<()> {
        self.execute("balloon", json!({ "value": target_bytes }))
            .map(|_| ())
    }

    /// QEMU's built-in balloon: the guest's memory size as the balloon reports it
    /// (`query-balloon`'s `actual`).
    pub fn balloon_actual(&mut self) -> Result<u64> {
        let ret = self.execute("query-balloon", Value::Null)?;
        ret.get("actual")
            .and_then(Value::as_u64)
            .ok_or_else(|| LabError::Qmp(format!("query-balloon returned {ret}")))
    }

    /// Reads a QOM property, e.g. the balloon's `guest-stats`.
    pub fn qom_get(&mut self, path: &str, property: &str) -> Result<Value> {
        self.execute("qom-get", json!({ "path": path, "property": property }))
    }

    pub fn qom_set(&mut self, path: &str, property: &str, value: Value) -> Result<()> {
        self.execute(
            "qom-set",
            json!({ "path": path, "property": property, "value": value }),
        )
        .map(|_| ())
    }
}
