//! The guest app protocol: the user-level balloon in the guest (balloon-guest) and its VM's
//! backend, over virtio-serial, vsock, or a Unix/TCP socket in tests. JSON, one message per
//! line, each with `v` (the protocol version) and `type`.
//!
//! The host sends targets; the app reports the page ranges it holds (after pinning them) and
//! asks before giving any back: a `deflate` is answered with an `ack` only after the backend
//! has stopped every discard of those pages, and only then may the app release them.

use serde::{Deserialize, Serialize};

pub const APP_PROTOCOL_VERSION: u32 = 1;
/// The longest line either side accepts.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// The most ranges in one `inflated` or `deflate` (a 64 MiB chunk of scattered 4 KiB pages
/// needs 16384); the backend refuses more.
pub const MAX_RANGES_PER_MESSAGE: usize = 16384;
/// Where the guest reads the per-VM secret that QEMU provides with
/// `-fw_cfg name=opt/vhost-balloon/app-secret,file=HOST_FILE` (the `raw` file of the
/// qemu_fw_cfg module is readable by root only).
pub const FW_CFG_SECRET_PATH: &str =
    "/sys/firmware/qemu_fw_cfg/by_name/opt/vhost-balloon/app-secret/raw";
/// The fw_cfg entry's name on the QEMU command line.
pub const FW_CFG_SECRET_NAME: &str = "opt/vhost-balloon/app-secret";

/// `count` 4 KiB pages from page frame number `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRange {
    pub start: u64,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostMessage {
    /// Hold this many bytes.
    Target { bytes: u64 },
    /// The `inflated` or `deflate` with this sequence number is done on the host.
    Ack { seq: u64 },
    /// The message with this sequence number was refused (bad ranges, not started device).
    Nack { seq: u64, reason: String },
    /// The connection is refused or ended by the host (failed authentication, no hello
    /// first, too many connections, silence); the host closes it after this.
    Refused { reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AppMessage {
    Hello {
        pid: u32,
        /// The per-VM secret, when the backend requires one (every transport an unprivileged
        /// guest process could open: vsock, TCP, Unix).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<String>,
    },
    /// These pages are pinned and held; the host may take them.
    Inflated { seq: u64, ranges: Vec<PageRange> },
    /// The app wants these pages back; it releases them only after the `ack`.
    Deflate { seq: u64, ranges: Vec<PageRange> },
    /// The app's state, for status and the scheduler.
    State {
        held_bytes: u64,
        /// Current inflation rate (bytes/s).
        rate_bytes_per_s: u64,
        /// /proc/pressure/memory "some avg10", when the guest has PSI.
        psi_some_avg10: Option<f64>,
        /// Inflation stopped short of the target (the guest could not give more).
        stalled: bool,
        /// The guest's memory figures, for a scheduler that has no driver statistics.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        meminfo: Option<GuestMemInfo>,
    },
}

/// The guest's memory as the app reads it (/proc/meminfo, /proc/vmstat): what a balloon
/// driver's statistics would say, for a guest without one. As untrusted as those.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestMemInfo {
    /// MemAvailable.
    pub available_bytes: u64,
    /// MemTotal.
    pub total_bytes: u64,
    /// Bytes swapped in since boot (pswpin pages in bytes, as the balloon driver's SWAP_IN).
    pub swap_in: u64,
    /// pgmajfault: major faults since boot.
    pub major_faults: u64,
}

impl GuestMemInfo {
    /// Whether the figures can be a guest's of `ram_bytes` of RAM (0: not known yet).
    pub fn plausible(&self, ram_bytes: u64) -> bool {
        self.available_bytes <= self.total_bytes
            && (ram_bytes == 0 || self.total_bytes <= ram_bytes)
    }
}

/// A message on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub v: u32,
    #[serde(flatten)]
    pub body: T,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AppProtocolError {
    #[error("line of {0} bytes exceeds the limit")]
    TooLong(usize),
    #[error("unsupported protocol version {0}")]
    Version(u32),
    #[error("bad message: {0}")]
    Bad(String),
}

pub fn encode<T: Serialize>(body: T) -> String {
    let mut s = serde_json::to_string(&Envelope {
        v: APP_PROTOCOL_VERSION,
        body,
    })
    .unwrap_or_default();
    s.push('\n');
    s
}

pub fn decode<T: for<'de> Deserialize<'de>>(line: &str) -> Result<T, AppProtocolError> {
    use crate::lines::{decode_versioned, DecodeError, Framing};
    if line.len() > MAX_LINE_BYTES {
        return Err(AppProtocolError::TooLong(line.len()));
    }
    let framing = Framing {
        version_key: "v",
        tag_key: "type",
        version: APP_PROTOCOL_VERSION,
    };
    decode_versioned::<Envelope<T>>(line, framing)
        .map(|e| e.body)
        .map_err(|e| match e {
            DecodeError::Version(v) => {
                AppProtocolError::Version(u32::try_from(v).unwrap_or(u32::MAX))
            }
            DecodeError::Bad(why) => AppProtocolError::Bad(why),
            other => AppProtocolError::Bad(other.to_string()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_figures_a_guest_of_that_size_could_have_are_plausible() {
        let m = |available_bytes, total_bytes| GuestMemInfo {
            available_bytes,
            total_bytes,
            ..Default::default()
        };
        assert!(m(100, 1000).plausible(1000));
        assert!(m(100, 1000).plausible(0), "RAM not known yet");
        assert!(!m(1001, 1000).plausible(0), "more available than total");
        assert!(!m(100, 2000).plausible(1000), "more than the guest's RAM");
    }

    #[test]
    fn round_trips() {
        let m = AppMessage::Inflated {
            seq: 7,
            ranges: vec![PageRange {
                start: 100,
                count: 512,
            }],
        };
        let line = encode(&m);
        assert!(line.ends_with('\n'));
        assert_eq!(decode::<AppMessage>(line.trim()), Ok(m));
        let h = HostMessage::Target { bytes: 1 << 28 };
        assert_eq!(decode::<HostMessage>(encode(&h).trim()), Ok(h));
    }

    #[test]
    fn hostile_lines_are_errors() {
        for line in [
            "",
            "garbage",
            r#"{"type":"hello","pid":1}"#,
            r#"{"v":2,"type":"hello","pid":1}"#,
            r#"{"v":1,"type":"inflated","seq":1,"ranges":[{"start":-1,"count":1}]}"#,
            r#"{"v":1,"type":"inflated","seq":1}"#,
            r#"{"v":1,"type":"explode"}"#,
            r#"{"v":1,"type":"hello","pid":1,"extra":true}"#,
            // A type is named, not numbered (serde alone would take 0 as hello).
            r#"{"v":1,"type":0,"pid":1}"#,
        ] {
            assert!(decode::<AppMessage>(line).is_err(), "{line}");
        }
        let long = "x".repeat(MAX_LINE_BYTES + 1);
        assert_eq!(
            decode::<AppMessage>(&long),
            Err(AppProtocolError::TooLong(long.len()))
        );
    }
}
