//! The scheduler's control API: a Unix socket speaking JSON lines, used by `balloonctl`. Every
//! request carries `version`; every reply has `ok` and either `error` or its payload.

use crate::trace::TraceRecord;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const API_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ApiRequest {
    Status {},
    /// Give a guest this much memory (its allocation, as QEMU's `balloon` command counts) and
    /// pin it there, outside the policy.
    Set {
        guest: String,
        memory_bytes: u64,
    },
    /// Pin a guest at its current allocation.
    Pin {
        guest: String,
    },
    /// Hand a guest back to the policy.
    Unpin {
        guest: String,
    },
    PolicyShow {},
    /// Change the policy kind (static, shares, pressure, mom, proxmox).
    PolicySet {
        kind: String,
    },
    /// Stream one status reply per tick on this connection until it closes.
    Watch {},
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiMessage {
    pub version: u32,
    #[serde(flatten)]
    pub request: ApiRequest,
}

/// The scheduler's state as `status` and the metrics show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SchedulerStatus {
    /// Ticks run since start.
    pub ticks: u64,
    pub uptime_s: f64,
    /// The latest tick's record (inputs and decisions), absent before the first tick.
    pub last: Option<TraceRecord>,
    /// Guest name to its driver's description.
    pub drivers: BTreeMap<String, String>,
    /// Guest name to the allocation an operator pinned it at.
    pub pinned: BTreeMap<String, u64>,
    /// Driver errors since start, per guest.
    pub driver_errors: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiReply {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SchedulerStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::policy::PolicyConfig>,
}

impl ApiReply {
    pub fn status(status: SchedulerStatus) -> Self {
        ApiReply {
            version: API_VERSION,
            ok: true,
            error: None,
            status: Some(status),
            policy: None,
        }
    }

    pub fn policy(policy: crate::policy::PolicyConfig) -> Self {
        ApiReply {
            version: API_VERSION,
            ok: true,
            error: None,
            status: None,
            policy: Some(policy),
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        ApiReply {
            version: API_VERSION,
            ok: false,
            error: Some(message.into()),
            status: None,
            policy: None,
        }
    }
}
