//! Our vhost-balloon-backend, through its control socket.
//!
//! `driver = { kind = "backend", control_socket = "/run/vhost-balloon/vm1.control" }`

use super::{BalloonDriver, DriverError, DriverReading, RawGuestStats};
use balloon_protocol::{ControlClient, ControlReply, ControlRequest};
use std::path::PathBuf;

pub struct BackendDriver {
    path: PathBuf,
    client: Option<ControlClient>,
}

impl BackendDriver {
    pub fn new(path: PathBuf) -> Self {
        BackendDriver { path, client: None }
    }

    fn request(&mut self, request: ControlRequest) -> Result<ControlReply, DriverError> {
        let io = |what: &str, path: &PathBuf| {
            let what = format!("{what} {}", path.display());
            move |source| DriverError::Io { what, source }
        };
        if self.client.is_none() {
            self.client =
                Some(ControlClient::connect(&self.path).map_err(io("connecting to", &self.path))?);
        }
        let client = self
            .client
            .as_mut()
            .ok_or_else(|| DriverError::Protocol("no client".into()))?;
        match client.request(request) {
            Ok(reply) if reply.ok => Ok(reply),
            Ok(reply) => Err(DriverError::Refused(reply.error.unwrap_or_default())),
            Err(e) => {
                // Reconnect on the next call.
                self.client = None;
                Err(io("talking to", &self.path)(e))
            }
        }
    }
}

impl BalloonDriver for BackendDriver {
    fn read(&mut self) -> Result<DriverReading, DriverError> {
        let status = self
            .request(ControlRequest::Status)?
            .status
            .ok_or_else(|| DriverError::Protocol("status reply without status".into()))?;
        let stats = status.stats.as_ref().and_then(|s| {
            let v = |k: &str| s.values.get(k).copied();
            Some(RawGuestStats {
                available_bytes: v("available_memory")?,
                total_bytes: v("total_memory").unwrap_or(0),
                swap_in: v("swap_in").unwrap_or(0),
                major_faults: v("major_faults").unwrap_or(0),
                age_seconds: Some(s.age_seconds),
            })
        });
        Ok(DriverReading {
            target_bytes: Some(status.target_bytes),
            actual_bytes: status.actual_bytes,
            stats,
        })
    }

    fn set_balloon(&mut self, balloon_bytes: u64) -> Result<(), DriverError> {
        self.request(ControlRequest::SetTarget {
            target_bytes: balloon_bytes,
        })
        .map(|_| ())
    }

    fn describe(&self) -> String {
        format!("backend {}", self.path.display())
    }
}
