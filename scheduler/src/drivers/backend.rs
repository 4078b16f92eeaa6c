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

#[cfg(test)]
mod tests {
    use super::*;
    use balloon_protocol::control::{ControlMessage, GuestStatsSnapshot};
    use balloon_protocol::BackendStatus;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// A fake backend: answers status and set_target (refusing odd sizes); the first
    /// connection is dropped after one reply, as a restarting backend would.
    fn fake_backend(path: &std::path::Path) {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let mut target = 0;
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(conn) = conn else { return };
                let mut w = conn.try_clone().unwrap();
                let mut line = String::new();
                let mut r = BufReader::new(conn);
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    let msg: ControlMessage = serde_json::from_str(&line).unwrap();
                    line.clear();
                    let reply = match msg.request {
                        ControlRequest::SetTarget { target_bytes } if target_bytes % 4096 != 0 => {
                            ControlReply::error("not page aligned")
                        }
                        ControlRequest::SetTarget { target_bytes } => {
                            target = target_bytes;
                            ControlReply::status(BackendStatus::default())
                        }
                        _ => ControlReply::status(BackendStatus {
                            target_bytes: target,
                            actual_bytes: target / 2,
                            stats: Some(GuestStatsSnapshot {
                                age_seconds: 0.5,
                                values: [
                                    ("available_memory".to_string(), 100),
                                    ("swap_in".to_string(), 3),
                                ]
                                .into_iter()
                                .collect(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                    };
                    let _ = w.write_all((serde_json::to_string(&reply).unwrap() + "\n").as_bytes());
                    if n == 0 {
                        break;
                    }
                }
            }
        });
    }

    #[test]
    fn reads_sets_refuses_and_reconnects() {
        let dir = std::env::temp_dir().join(format!("backend-drv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("control.sock");
        let _ = std::fs::remove_file(&sock);
        let mut d = BackendDriver::new(sock.clone());
        assert!(
            matches!(d.read(), Err(DriverError::Io { .. })),
            "no backend yet"
        );
        fake_backend(&sock);
        // The first connection answers once and goes away: the second call fails, the third
        // reconnects.
        assert!(d.read().is_ok());
        assert!(d.set_balloon(8192).is_err());
        d.set_balloon(8192).unwrap();
        let r = d.read().unwrap();
        assert_eq!((r.target_bytes, r.actual_bytes), (Some(8192), 4096));
        let s = r.stats.unwrap();
        assert_eq!((s.available_bytes, s.swap_in), (100, 3));
        assert!(matches!(d.set_balloon(5), Err(DriverError::Refused(m)) if m.contains("aligned")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
