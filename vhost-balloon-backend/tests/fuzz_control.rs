//! Fuzzing the control protocol: the backend's `control::reply_to_line` on arbitrary lines
//! (what any process allowed on the control socket may send), and the scheduler side's parse
//! of replies (`ControlReply`).
//!
//! Cases per property: `PROPTEST_CASES` when set (`make fuzz` sets a large number), else the
//! small default below, so that `cargo test` stays quick.

use balloon_protocol::app::GuestMemInfo;
use balloon_protocol::control::{
    AppStatus, BackendStatus, ControlMessage, ControlReply, ControlRequest, GuestStatsSnapshot,
    RejectedInput,
};
use balloon_protocol::CONTROL_PROTOCOL_VERSION;
#[path = "../protocol/tests/support/mod.rs"]
mod support;

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::sync::Mutex;
use support::cases::config;
use support::json::{arb_json, key, mutation, number, Mutation, Names};
use vhost_balloon_backend::control::{reply_to_line, ControlHandler};

/// Records what reaches it and always says ok, so `reply.ok` tells whether it was reached.
#[derive(Default)]
struct Recorder(Mutex<Vec<ControlRequest>>);

impl ControlHandler for Recorder {
    fn handle(&self, request: ControlRequest) -> ControlReply {
        self.0.lock().unwrap().push(request);
        ControlReply::status(BackendStatus::default())
    }
}

const CMDS: [&str; 5] = [
    "status",
    "set_target",
    "set_stats_interval",
    "set_discard",
    "set_app_target",
];
const NAMES: Names = Names {
    fields: &FIELDS,
    tags: &CMDS,
};
const FIELDS: [&str; 8] = [
    "version",
    "cmd",
    "target_bytes",
    "seconds",
    "enabled",
    "v",
    "type",
    "ok",
];

/// Objects that look like requests: mostly version 1 and a known command.
fn request_like() -> impl Strategy<Value = Value> {
    (
        prop_oneof![4 => Just(json!(1)), 1 => number(), 1 => arb_json(NAMES)],
        prop_oneof![
            4 => proptest::sample::select(&CMDS[..]).prop_map(Value::from),
            1 => arb_json(NAMES)
        ],
        btree_map(key(NAMES), arb_json(NAMES), 0..4),
        any::<bool>(),
    )
        .prop_map(|(version, cmd, fields, with_version)| {
            let mut m: Map<String, Value> = fields.into_iter().collect();
            if with_version {
                m.insert("version".into(), version);
            }
            m.insert("cmd".into(), cmd);
            Value::Object(m)
        })
}

fn request() -> impl Strategy<Value = ControlRequest> {
    prop_oneof![
        Just(ControlRequest::Status {}),
        any::<u64>().prop_map(|target_bytes| ControlRequest::SetTarget { target_bytes }),
        any::<u64>().prop_map(|seconds| ControlRequest::SetStatsInterval { seconds }),
        any::<bool>().prop_map(|enabled| ControlRequest::SetDiscard { enabled }),
        any::<u64>().prop_map(|target_bytes| ControlRequest::SetAppTarget { target_bytes }),
    ]
}

/// The command name and fields of a request.
fn shape(r: &ControlRequest) -> (&'static str, &'static [&'static str]) {
    match r {
        ControlRequest::Status {} => ("status", &[]),
        ControlRequest::SetTarget { .. } => ("set_target", &["target_bytes"]),
        ControlRequest::SetStatsInterval { .. } => ("set_stats_interval", &["seconds"]),
        ControlRequest::SetDiscard { .. } => ("set_discard", &["enabled"]),
        ControlRequest::SetAppTarget { .. } => ("set_app_target", &["target_bytes"]),
    }
}

/// A request that reached the handler is exactly what the line said: an object with
/// `version` 1, its command, its fields and nothing else.
fn check_reached(line: &str, r: &ControlRequest) -> Result<(), TestCaseError> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| TestCaseError::fail(format!("handled invalid JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| TestCaseError::fail("handled a non-object"))?;
    prop_assert_eq!(
        obj.get("version").and_then(Value::as_u64),
        Some(u64::from(CONTROL_PROTOCOL_VERSION))
    );
    let (cmd, fields) = shape(r);
    prop_assert_eq!(obj.get("cmd").and_then(Value::as_str), Some(cmd));
    for k in obj.keys() {
        prop_assert!(
            k == "version" || k == "cmd" || fields.contains(&k.as_str()),
            "unknown field {:?} accepted with {:?}: {}",
            k,
            cmd,
            line
        );
    }
    let u = |k: &str| obj.get(k).and_then(Value::as_u64);
    match r {
        ControlRequest::Status {} => {}
        ControlRequest::SetTarget { target_bytes }
        | ControlRequest::SetAppTarget { target_bytes } => {
            prop_assert_eq!(u("target_bytes"), Some(*target_bytes))
        }
        ControlRequest::SetStatsInterval { seconds } => {
            prop_assert_eq!(u("seconds"), Some(*seconds))
        }
        ControlRequest::SetDiscard { enabled } => {
            prop_assert_eq!(obj.get("enabled").and_then(Value::as_bool), Some(*enabled))
        }
    }
    Ok(())
}

/// Runs `line`; every line gets one reply, ok exactly when it reached the handler, which only
/// well-formed requests of this version do. Returns what reached it, and the reply.
fn exchange(line: &str) -> Result<(Option<ControlRequest>, ControlReply), TestCaseError> {
    let rec = Recorder::default();
    let reply = reply_to_line(line, &rec);
    let mut seen = rec.0.into_inner().unwrap();
    prop_assert!(seen.len() <= 1, "handler called {} times", seen.len());
    let reached = seen.pop();
    prop_assert_eq!(reply.version, CONTROL_PROTOCOL_VERSION);
    match &reached {
        Some(r) => {
            prop_assert!(reply.ok && reply.error.is_none(), "{:?}", reply);
            check_reached(line, r)?;
        }
        None => {
            prop_assert!(!reply.ok, "ok without the handler: {:?}", reply);
            prop_assert!(
                reply.error.as_ref().is_some_and(|e| !e.is_empty()),
                "an error reply says why: {:?}",
                reply
            );
            prop_assert!(reply.status.is_none());
        }
    }
    // The reply is a line the client can read back.
    let text = serde_json::to_string(&reply).unwrap();
    prop_assert!(!text.contains('\n'));
    prop_assert_eq!(
        serde_json::from_str::<ControlReply>(&text).ok(),
        Some(reply.clone())
    );
    Ok((reached, reply))
}

fn finite() -> impl Strategy<Value = f64> {
    // Short decimals: serde_json's default float parsing is best-effort for long mantissas.
    (any::<i32>(), 0i32..4).prop_map(|(m, e)| f64::from(m) / 10f64.powi(e))
}

fn stats() -> impl Strategy<Value = GuestStatsSnapshot> {
    (
        finite(),
        btree_map("[a-z_]{1,16}", any::<u64>(), 0..6),
        btree_map(any::<u16>(), any::<u64>(), 0..4),
    )
        .prop_map(|(age_seconds, values, unknown)| GuestStatsSnapshot {
            age_seconds,
            values,
            unknown,
        })
}

fn app_status() -> impl Strategy<Value = AppStatus> {
    (
        any::<bool>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
        proptest::option::of(finite()),
        any::<bool>(),
        proptest::option::of(any::<String>()),
        proptest::option::of((any::<[u64; 4]>(), finite())),
    )
        .prop_map(
            |(
                connected,
                target_bytes,
                ballooned_bytes,
                held_bytes,
                stalled,
                psi,
                reclaimable,
                note,
                meminfo,
            )| {
                AppStatus {
                    connected,
                    target_bytes,
                    ballooned_bytes,
                    held_bytes,
                    stalled,
                    psi_some_avg10: psi,
                    reclaimable,
                    note,
                    meminfo: meminfo.map(|(m, age)| {
                        (
                            GuestMemInfo {
                                available_bytes: m[0],
                                total_bytes: m[1],
                                swap_in: m[2],
                                major_faults: m[3],
                            },
                            age,
                        )
                    }),
                }
            },
        )
}

fn backend_status() -> impl Strategy<Value = BackendStatus> {
    (
        (
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
        ),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
        ),
        (any::<bool>(), any::<u64>(), proptest::option::of(stats())),
        (
            any::<(u64, u64, u64)>(),
            vec("[A-Z_]{1,20}", 0..6),
            app_status(),
        ),
    )
        .prop_map(|(a, b, c, d)| BackendStatus {
            device_started: a.0,
            guest_ram_bytes: a.1,
            target_bytes: a.2,
            actual_bytes: a.3,
            actual_from_driver: a.4,
            driver_actual_bytes: a.4.then_some(a.3 ^ b.0),
            driver_claim_disputed: a.4 && b.3,
            ballooned_bytes: b.0,
            reclaimed_bytes: b.1,
            reported_free_bytes: b.2,
            discard_enabled: b.3,
            discard_errors: b.4,
            discard_calls: b.5,
            config_change_channel: c.0,
            stats_interval_seconds: c.1,
            stats: c.2,
            rejected: RejectedInput {
                pages_outside_ram: d.0 .0,
                bad_descriptors: d.0 .1,
                bad_stats: d.0 .2,
            },
            features: d.1.clone(),
            offered_features: d.1,
            app: d.2,
        })
}

fn reply() -> impl Strategy<Value = ControlReply> {
    prop_oneof![
        backend_status().prop_map(ControlReply::status),
        any::<String>().prop_map(ControlReply::error),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_bytes_get_an_error_reply(bytes in vec(any::<u8>(), 0..512)) {
        exchange(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn arbitrary_lines_get_one_reply(line in prop_oneof![
        any::<String>(),
        r#"[{}\[\]":,0-9a-z \-.eE\\]{0,80}"#,
        r#"\{"version":1,"cmd":"(status|set_target|set_stats_interval|set_discard|set_app_target)"[,:"a-z_0-9\-\[\]{}. ]{0,60}\}"#,
    ]) {
        exchange(&line)?;
    }

    #[test]
    fn arbitrary_json_reaches_the_handler_only_well_formed(v in prop_oneof![arb_json(NAMES), request_like()]) {
        exchange(&serde_json::to_string(&v).unwrap())?;
    }

    #[test]
    fn mutated_requests_reach_the_handler_only_well_formed(r in request(), mu in mutation(NAMES, false)) {
        let (_, fields) = shape(&r);
        let value = serde_json::to_value(ControlMessage::new(r.clone())).unwrap();
        let mut obj = value.as_object().unwrap().clone();
        let line = match mu {
            Mutation::Nothing | Mutation::Pretty => {
                let line = if matches!(mu, Mutation::Pretty) {
                    serde_json::to_string_pretty(&obj).unwrap()
                } else {
                    serde_json::to_string(&obj).unwrap()
                };
                let (reached, _) = exchange(&line)?;
                prop_assert_eq!(reached, Some(r));
                return Ok(());
            }
            Mutation::RemoveKey(i) => {
                let keys: Vec<String> = obj.keys().cloned().collect();
                let k = i.get(&keys).clone();
                obj.remove(&k);
                let line = serde_json::to_string(&obj).unwrap();
                let (reached, reply) = exchange(&line)?;
                prop_assert!(reached.is_none(), "handled without {}: {}", k, line);
                if k == "version" {
                    prop_assert_eq!(reply.error.as_deref(), Some("missing \"version\""));
                }
                return Ok(());
            }
            Mutation::SetKey(i, v) => {
                let keys: Vec<String> = obj.keys().cloned().collect();
                obj.insert(i.get(&keys).clone(), v);
                serde_json::to_string(&obj).unwrap()
            }
            Mutation::AddUnknown(k, v) => {
                let known = k == "version" || k == "cmd" || fields.contains(&k.as_str());
                obj.insert(k.clone(), v);
                let line = serde_json::to_string(&obj).unwrap();
                if !known {
                    let (reached, _) = exchange(&line)?;
                    prop_assert!(reached.is_none(), "unknown field {:?} accepted: {}", k, line);
                    return Ok(());
                }
                line
            }
            Mutation::SetVersion(v) => {
                obj.insert("version".into(), v.clone());
                let line = serde_json::to_string(&obj).unwrap();
                let (reached, reply) = exchange(&line)?;
                match v.as_u64() {
                    Some(1) => prop_assert_eq!(reached, Some(r)),
                    Some(n) => {
                        prop_assert!(reached.is_none());
                        let e = reply.error.unwrap_or_default();
                        prop_assert!(
                            e.starts_with(&format!("unsupported protocol version {n} ")),
                            "{}",
                            e
                        );
                    }
                    None => {
                        prop_assert!(reached.is_none());
                        prop_assert_eq!(reply.error.as_deref(), Some("missing \"version\""));
                    }
                }
                return Ok(());
            }
            Mutation::Nested(in_array) => {
                let nested = if in_array {
                    json!([obj])
                } else {
                    json!({ "version": 1, "cmd": obj.get("cmd"), "request": obj })
                };
                let line = serde_json::to_string(&nested).unwrap();
                let (reached, _) = exchange(&line)?;
                prop_assert!(reached.is_none(), "nested request handled: {}", line);
                return Ok(());
            }
            // Requests carry no ranges: `mutation(NAMES, false)` never makes one.
            Mutation::RangeJunk(..) => return Ok(()),
        };
        exchange(&line)?;
    }

    #[test]
    fn replies_parse_from_arbitrary_json_without_panic(v in prop_oneof![
        arb_json(NAMES),
        (any::<u32>(), any::<bool>(), proptest::option::of(any::<String>()), arb_json(NAMES)).prop_map(
            |(version, ok, error, status)| json!({ "version": version, "ok": ok, "error": error, "status": status })
        ),
    ]) {
        let text = serde_json::to_string(&v).unwrap();
        if let Ok(reply) = serde_json::from_str::<ControlReply>(&text) {
            // An object, or (serde's struct-from-array form) its fields in order.
            let field = |name: &str, at: usize| v.get(name).or_else(|| v.get(at));
            prop_assert_eq!(field("version", 0).and_then(Value::as_u64), Some(u64::from(reply.version)));
            prop_assert_eq!(field("ok", 1).and_then(Value::as_bool), Some(reply.ok));
            let error = field("error", 2).and_then(Value::as_str).map(str::to_string);
            prop_assert_eq!(error, reply.error.clone());
        }
        // Arbitrary text too (what a broken or hostile backend could answer).
        let _ = serde_json::from_slice::<ControlReply>(&text.as_bytes()[..text.len() / 2]);
    }

    #[test]
    fn replies_round_trip(reply in reply()) {
        let text = serde_json::to_string(&reply).unwrap();
        prop_assert!(!text.contains('\n'));
        prop_assert_eq!(serde_json::from_str::<ControlReply>(&text).unwrap(), reply);
    }
}
