//! The backend's control protocol (a Unix socket, JSON lines). Each request is one object with
//! `version` and `cmd`; each reply is one object with `version`, `ok`, and either `error` or the
//! backend's `status`. Sizes are bytes; the balloon's target and actual are balloon sizes (memory
//! taken from the guest), not guest memory sizes.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const CONTROL_PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Report the backend's status.
    Status {},
    /// Ask the guest to hold a balloon of this many bytes (rounded down to 4 KiB pages).
    SetTarget { target_bytes: u64 },
    /// How often the guest is asked for fresh statistics; 0 stops asking.
    SetStatsInterval { seconds: u64 },
    /// Switch discarding on or off. Off keeps ballooned memory allocated on the host: for
    /// whatever must not see guest memory vanish (VFIO passthrough, postcopy migration,
    /// background snapshots), which QEMU's own discard inhibitors cannot stop for an
    /// out-of-process device.
    SetDiscard { enabled: bool },
    /// Ask the guest app (balloon-guest) to hold this many bytes.
    SetAppTarget { target_bytes: u64 },
}

/// A request on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlMessage {
    pub version: u32,
    #[serde(flatten)]
    pub request: ControlRequest,
}

impl ControlMessage {
    pub fn new(request: ControlRequest) -> Self {
        ControlMessage {
            version: CONTROL_PROTOCOL_VERSION,
            request,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlReply {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<BackendStatus>,
}

impl ControlReply {
    pub fn status(status: BackendStatus) -> Self {
        ControlReply {
            version: CONTROL_PROTOCOL_VERSION,
            ok: true,
            error: None,
            status: Some(status),
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        ControlReply {
            version: CONTROL_PROTOCOL_VERSION,
            ok: false,
            error: Some(message.into()),
            status: None,
        }
    }
}

/// Guest input the backend refused, by kind. Counters only grow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedInput {
    /// Inflate/deflate/report pages outside guest RAM (skipped, never discarded).
    pub pages_outside_ram: u64,
    /// Descriptor chains with the wrong direction, unreadable addresses or bad lengths.
    pub bad_descriptors: u64,
    /// Statistics buffers that were not a whole number of tag/value entries.
    pub bad_stats: u64,
}

/// The guest's latest statistics (virtio-balloon stats queue).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestStatsSnapshot {
    /// Seconds since the guest sent them.
    pub age_seconds: f64,
    /// Known tags by name (`free_memory`, `available_memory`, ...), values as the guest sent
    /// them (memory figures in bytes, the others as counts).
    pub values: BTreeMap<String, u64>,
    /// Tags this backend does not know, raw.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<u16, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// The guest driver acknowledged the features and set up its queues.
    pub device_started: bool,
    /// Guest RAM in the memory table (0 until the frontend sends it).
    pub guest_ram_bytes: u64,
    /// Balloon size the device asks for (config `num_pages`).
    pub target_bytes: u64,
    /// The driver's balloon as the host holds it: the pages the driver handed over and the
    /// backend tracks (and discards). Never the driver's own word, which a guest kernel can set
    /// to anything (`driver_actual_bytes`).
    pub actual_bytes: u64,
    /// Whether the frontend forwarded the driver's writes of `actual`.
    pub actual_from_driver: bool,
    /// The driver's own word for its balloon (config `actual`), if it wrote one.
    #[serde(default)]
    pub driver_actual_bytes: Option<u64>,
    /// The driver's word has disagreed with the pages it handed over for longer than an honest
    /// driver's lag: a guest kernel that lies, or tracking lost (a backend restarted without its
    /// state file). The balloon counts as `actual_bytes` all the same.
    #[serde(default)]
    pub driver_claim_disputed: bool,
    /// Pages currently ballooned, as tracked from inflate/deflate requests.
    pub ballooned_bytes: u64,
    /// Total bytes handed back to the host by discarding ballooned pages (grows).
    pub reclaimed_bytes: u64,
    /// Total bytes discarded from free page reports (grows).
    pub reported_free_bytes: u64,
    pub discard_enabled: bool,
    /// Discards the host refused (the pages stay allocated).
    pub discard_errors: u64,
    /// Discard calls made (grows): each ends in a TLB-shootdown round on the VMM's CPUs, so
    /// bytes per call says how well discards merge.
    #[serde(default)]
    pub discard_calls: u64,
    /// Whether the backend can tell the driver about target changes (the backend request
    /// channel was found).
    pub config_change_channel: bool,
    pub stats_interval_seconds: u64,
    pub stats: Option<GuestStatsSnapshot>,
    pub rejected: RejectedInput,
    /// Negotiated virtio features, by name: what the guest driver acknowledged, which a VMM
    /// may have cut (cloud-hypervisor passes the guest no device feature).
    pub features: Vec<String>,
    /// The features this backend offers, by name: those missing from `features` the guest
    /// does not have.
    #[serde(default)]
    pub offered_features: Vec<String>,
    /// The user-level balloon app of this VM (balloon-guest), if the backend serves one.
    #[serde(default)]
    pub app: AppStatus,
}

/// The guest app's balloon, apart from the driver's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppStatus {
    /// An app is talking to the backend now.
    pub connected: bool,
    /// Bytes the app is asked to hold.
    pub target_bytes: u64,
    /// Bytes of app pages the backend tracks (and has returned to the host).
    pub ballooned_bytes: u64,
    /// Bytes the app says it holds.
    pub held_bytes: u64,
    pub stalled: bool,
    pub psi_some_avg10: Option<f64>,
    /// Whether app pages can be reclaimed; if not, `note` says why.
    pub reclaimable: bool,
    pub note: Option<String>,
    /// The guest's memory figures from the app, and their age in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meminfo: Option<(crate::app::GuestMemInfo, f64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        let msg = ControlMessage::new(ControlRequest::SetTarget {
            target_bytes: 1 << 30,
        });
        let text = serde_json::to_string(&msg).unwrap();
        assert_eq!(
            text,
            r#"{"version":1,"cmd":"set_target","target_bytes":1073741824}"#
        );
        assert_eq!(serde_json::from_str::<ControlMessage>(&text).unwrap(), msg);
        let status: ControlMessage =
            serde_json::from_str(r#"{"version":1,"cmd":"status"}"#).unwrap();
        assert_eq!(status.request, ControlRequest::Status {});
    }

    #[test]
    fn bad_requests_do_not_parse() {
        for text in [
            r#"{"version":1,"cmd":"explode"}"#,
            r#"{"version":1,"cmd":"set_target"}"#,
            r#"{"version":1,"cmd":"set_target","target_bytes":-5}"#,
            r#"{"cmd":"status"}"#,
            // Unknown fields are refused by every command, status too (a unit variant would
            // take any).
            r#"{"version":1,"cmd":"status","target_bytes":5}"#,
            r#"{"version":1,"cmd":"set_target","target_bytes":5,"seconds":1}"#,
            "not json",
        ] {
            assert!(
                serde_json::from_str::<ControlMessage>(text).is_err(),
                "{text}"
            );
        }
    }

    #[test]
    fn reply_round_trip() {
        let reply = ControlReply::status(BackendStatus {
            target_bytes: 4096,
            ..Default::default()
        });
        let text = serde_json::to_string(&reply).unwrap();
        assert_eq!(serde_json::from_str::<ControlReply>(&text).unwrap(), reply);
        let err = ControlReply::error("nope");
        let text = serde_json::to_string(&err).unwrap();
        assert_eq!(text, r#"{"version":1,"ok":false,"error":"nope"}"#);
    }
}
