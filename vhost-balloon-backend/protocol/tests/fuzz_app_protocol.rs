//! Fuzzing the guest app protocol (`balloon_protocol::app`): what a guest process (untrusted)
//! sends the backend, and what the backend sends the app. Arbitrary text, arbitrary JSON and
//! structured mutations of valid messages never panic; what decodes is exactly what the line
//! said; valid messages round-trip; lines over `MAX_LINE_BYTES` are refused.
//!
//! Cases per property: `PROPTEST_CASES` when set (`make fuzz` sets a large number), else the
//! small default below, so that `cargo test` stays quick.

use balloon_protocol::app::{
    decode, encode, AppMessage, AppProtocolError, Envelope, GuestMemInfo, HostMessage, PageRange,
    APP_PROTOCOL_VERSION, MAX_LINE_BYTES, MAX_RANGES_PER_MESSAGE,
};
mod support;

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{json, Map, Value};
use support::cases::config;
use support::json::{arb_json, key, mutation, number, Mutation, Names};

/// For properties whose cases cost a megabyte line each: `PROPTEST_CASES / divisor` when set,
/// else `default`. Run through a `TestRunner` directly, since `proptest!` would put the
/// variable's full count back.
fn scaled(default: u32, divisor: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(default, |n| (n / divisor).max(1));
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn run_scaled<S: Strategy>(
    cfg: ProptestConfig,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    if let Err(e) = TestRunner::new(cfg).run(&strategy, test) {
        panic!("{e}");
    }
}

const APP_TYPES: [&str; 4] = ["hello", "inflated", "deflate", "state"];
const HOST_TYPES: [&str; 4] = ["target", "ack", "nack", "refused"];
const TAGS: [&str; 8] = [
    "hello", "inflated", "deflate", "state", "target", "ack", "nack", "refused",
];
const NAMES: Names = Names {
    fields: &FIELDS,
    tags: &TAGS,
};
const FIELDS: [&str; 19] = [
    "v",
    "type",
    "pid",
    "secret",
    "seq",
    "ranges",
    "start",
    "count",
    "held_bytes",
    "rate_bytes_per_s",
    "psi_some_avg10",
    "stalled",
    "meminfo",
    "available_bytes",
    "total_bytes",
    "bytes",
    "reason",
    "version",
    "cmd",
];

/// An object that looks like a message: mostly `v` 1 and a known type, then arbitrary fields.
fn message_like() -> impl Strategy<Value = Value> {
    (
        prop_oneof![4 => Just(json!(1)), 1 => number(), 1 => arb_json(NAMES)],
        prop_oneof![
            proptest::sample::select(&APP_TYPES[..]).prop_map(Value::from),
            proptest::sample::select(&HOST_TYPES[..]).prop_map(Value::from),
            arb_json(NAMES),
        ],
        btree_map(key(NAMES), arb_json(NAMES), 0..6),
        any::<bool>(),
    )
        .prop_map(|(v, ty, fields, with_v)| {
            let mut m: Map<String, Value> = fields.into_iter().collect();
            if with_v {
                m.insert("v".into(), v);
            }
            m.insert("type".into(), ty);
            Value::Object(m)
        })
}

/// Short decimals, as /proc/pressure/memory gives them, and any finite float (exact both ways:
/// the workspace enables serde_json's `float_roundtrip`; NaN and infinities are not JSON).
fn psi() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        Just(None),
        (0u32..=10_000).prop_map(|c| Some(f64::from(c) / 100.0)),
        (any::<i32>(), 0i32..4).prop_map(|(m, e)| Some(f64::from(m) / 10f64.powi(e))),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Some),
    ]
}

fn range() -> impl Strategy<Value = PageRange> {
    (
        prop_oneof![0u64..1 << 20, any::<u64>()],
        prop_oneof![0u64..4096, any::<u64>()],
    )
        .prop_map(|(start, count)| PageRange { start, count })
}

fn app_message() -> impl Strategy<Value = AppMessage> {
    prop_oneof![
        (any::<u32>(), proptest::option::of(any::<String>()))
            .prop_map(|(pid, secret)| AppMessage::Hello { pid, secret }),
        (any::<u64>(), vec(range(), 0..16))
            .prop_map(|(seq, ranges)| AppMessage::Inflated { seq, ranges }),
        (any::<u64>(), vec(range(), 0..16))
            .prop_map(|(seq, ranges)| AppMessage::Deflate { seq, ranges }),
        (
            any::<u64>(),
            any::<u64>(),
            psi(),
            any::<bool>(),
            proptest::option::of(any::<[u64; 4]>())
        )
            .prop_map(
                |(held_bytes, rate_bytes_per_s, psi_some_avg10, stalled, meminfo)| {
                    AppMessage::State {
                        held_bytes,
                        rate_bytes_per_s,
                        psi_some_avg10,
                        stalled,
                        meminfo: meminfo.map(|m| GuestMemInfo {
                            available_bytes: m[0],
                            total_bytes: m[1],
                            swap_in: m[2],
                            major_faults: m[3],
                        }),
                    }
                }
            ),
    ]
}

fn host_message() -> impl Strategy<Value = HostMessage> {
    prop_oneof![
        any::<u64>().prop_map(|bytes| HostMessage::Target { bytes }),
        any::<u64>().prop_map(|seq| HostMessage::Ack { seq }),
        (any::<u64>(), any::<String>()).prop_map(|(seq, reason)| HostMessage::Nack { seq, reason }),
        any::<String>().prop_map(|reason| HostMessage::Refused { reason }),
    ]
}

fn as_value<T: serde::Serialize>(body: &T) -> Value {
    serde_json::to_value(Envelope {
        v: APP_PROTOCOL_VERSION,
        body,
    })
    .unwrap()
}

/// The type name and the fields (required, optional) of a decoded app message.
fn app_shape(
    m: &AppMessage,
) -> (
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
) {
    match m {
        AppMessage::Hello { .. } => ("hello", &["pid"], &["secret"]),
        AppMessage::Inflated { .. } => ("inflated", &["seq", "ranges"], &[]),
        AppMessage::Deflate { .. } => ("deflate", &["seq", "ranges"], &[]),
        AppMessage::State { .. } => (
            "state",
            &["held_bytes", "rate_bytes_per_s", "stalled"],
            &["psi_some_avg10", "meminfo"],
        ),
    }
}

fn host_shape(m: &HostMessage) -> (&'static str, &'static [&'static str]) {
    match m {
        HostMessage::Target { .. } => ("target", &["bytes"]),
        HostMessage::Ack { .. } => ("ack", &["seq"]),
        HostMessage::Nack { .. } => ("nack", &["seq", "reason"]),
        HostMessage::Refused { .. } => ("refused", &["reason"]),
    }
}

/// The object a decoded message came from, with `v` 1, its type, no field it does not have,
/// and every required field present.
fn check_keys<'a>(
    input: &'a Value,
    ty: &str,
    required: &[&str],
    optional: &[&str],
) -> Result<&'a Map<String, Value>, TestCaseError> {
    let obj = input
        .as_object()
        .ok_or_else(|| TestCaseError::fail("decoded from a non-object"))?;
    prop_assert_eq!(obj.get("v").and_then(Value::as_u64), Some(1));
    prop_assert_eq!(obj.get("type").and_then(Value::as_str), Some(ty));
    for k in obj.keys() {
        prop_assert!(
            k == "v"
                || k == "type"
                || required.contains(&k.as_str())
                || optional.contains(&k.as_str()),
            "unknown field {:?} accepted in {}",
            k,
            input
        );
    }
    for k in required {
        prop_assert!(obj.contains_key(*k), "required field {} missing", k);
    }
    Ok(obj)
}

fn u64_field(obj: &Map<String, Value>, k: &str) -> Option<u64> {
    obj.get(k).and_then(Value::as_u64)
}

/// A page range as the line gave it: an object `{start, count}` or (serde's struct-from-array
/// form) `[start, count]`.
fn range_of(v: &Value) -> Option<(u64, u64)> {
    match v {
        Value::Object(o) => Some((u64_field(o, "start")?, u64_field(o, "count")?)),
        Value::Array(a) if a.len() == 2 => Some((a[0].as_u64()?, a[1].as_u64()?)),
        _ => None,
    }
}

fn optional_is<T: PartialEq>(
    got: &Option<T>,
    input: Option<&Value>,
    of: impl Fn(&Value) -> Option<T>,
) -> bool {
    match (got, input) {
        (None, None) | (None, Some(Value::Null)) => true,
        (Some(g), Some(v)) => of(v).as_ref() == Some(g),
        _ => false,
    }
}

/// What `decode` gave is what `input` said, field by field.
fn check_app(input: &Value, m: &AppMessage) -> Result<(), TestCaseError> {
    let (ty, required, optional) = app_shape(m);
    let obj = check_keys(input, ty, required, optional)?;
    match m {
        AppMessage::Hello { pid, secret } => {
            prop_assert_eq!(u64_field(obj, "pid"), Some(u64::from(*pid)));
            prop_assert!(optional_is(secret, obj.get("secret"), |v| v
                .as_str()
                .map(str::to_string)));
        }
        AppMessage::Inflated { seq, ranges } | AppMessage::Deflate { seq, ranges } => {
            prop_assert_eq!(u64_field(obj, "seq"), Some(*seq));
            let given = obj["ranges"]
                .as_array()
                .ok_or_else(|| TestCaseError::fail("ranges decoded from a non-array"))?;
            prop_assert_eq!(given.len(), ranges.len());
            for (g, r) in given.iter().zip(ranges) {
                prop_assert_eq!(range_of(g), Some((r.start, r.count)));
            }
        }
        AppMessage::State {
            held_bytes,
            rate_bytes_per_s,
            psi_some_avg10,
            stalled,
            meminfo,
        } => {
            if let Some(m) = meminfo {
                let given = &obj["meminfo"];
                prop_assert_eq!(given["available_bytes"].as_u64(), Some(m.available_bytes));
                prop_assert_eq!(given["total_bytes"].as_u64(), Some(m.total_bytes));
            }
            prop_assert_eq!(u64_field(obj, "held_bytes"), Some(*held_bytes));
            prop_assert_eq!(u64_field(obj, "rate_bytes_per_s"), Some(*rate_bytes_per_s));
            prop_assert_eq!(obj["stalled"].as_bool(), Some(*stalled));
            prop_assert!(optional_is(
                psi_some_avg10,
                obj.get("psi_some_avg10"),
                Value::as_f64
            ));
        }
    }
    // And it is stable: encoding it again decodes to the same.
    prop_assert_eq!(decode::<AppMessage>(encode(m).trim()), Ok(m.clone()));
    Ok(())
}

fn check_host(input: &Value, m: &HostMessage) -> Result<(), TestCaseError> {
    let (ty, required) = host_shape(m);
    let obj = check_keys(input, ty, required, &[])?;
    let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
    match m {
        HostMessage::Target { bytes } => prop_assert_eq!(u64_field(obj, "bytes"), Some(*bytes)),
        HostMessage::Ack { seq } => prop_assert_eq!(u64_field(obj, "seq"), Some(*seq)),
        HostMessage::Nack { seq, reason } => {
            prop_assert_eq!(u64_field(obj, "seq"), Some(*seq));
            prop_assert_eq!(text("reason"), Some(reason.clone()));
        }
        HostMessage::Refused { reason } => {
            prop_assert_eq!(text("reason"), Some(reason.clone()))
        }
    }
    prop_assert_eq!(decode::<HostMessage>(encode(m).trim()), Ok(m.clone()));
    Ok(())
}

/// Decodes `line` both ways; whatever decodes must be what the line said.
fn decode_both(line: &str) -> Result<(), TestCaseError> {
    let app = decode::<AppMessage>(line);
    let host = decode::<HostMessage>(line);
    if app.is_ok() || host.is_ok() {
        let value: Value = serde_json::from_str(line)
            .map_err(|e| TestCaseError::fail(format!("decoded from invalid JSON: {e}")))?;
        if let Ok(m) = &app {
            check_app(&value, m)?;
        }
        if let Ok(m) = &host {
            check_host(&value, m)?;
        }
    }
    Ok(())
}

fn missing_v() -> AppProtocolError {
    AppProtocolError::Bad("missing \"v\"".into())
}

/// Applies `mutation` to the object of `original` (an app message, or a host message) and
/// checks what decode makes of it.
fn mutate_and_check(
    value: Value,
    fields: (&[&str], &[&str]),
    mutation: Mutation,
    same: impl Fn(&str) -> bool,
) -> Result<(), TestCaseError> {
    let (required, optional) = fields;
    let mut obj = value.as_object().unwrap().clone();
    let line = match mutation {
        Mutation::Nothing => {
            let line = serde_json::to_string(&obj).unwrap();
            prop_assert!(
                same(&line),
                "the unchanged message did not decode to itself"
            );
            line
        }
        Mutation::Pretty => {
            let line = serde_json::to_string_pretty(&obj).unwrap();
            prop_assert!(
                same(&line),
                "a reformatted message did not decode to itself"
            );
            line
        }
        Mutation::RemoveKey(i) => {
            let keys: Vec<String> = obj.keys().cloned().collect();
            let k = i.get(&keys).clone();
            obj.remove(&k);
            let line = serde_json::to_string(&obj).unwrap();
            let app = decode::<AppMessage>(&line);
            let host = decode::<HostMessage>(&line);
            if k == "v" {
                prop_assert_eq!(app, Err(missing_v()));
                prop_assert_eq!(host, Err(missing_v()));
            } else if k == "type" || required.contains(&k.as_str()) {
                prop_assert!(app.is_err() && host.is_err(), "decoded without {}", k);
            } else {
                prop_assert!(optional.contains(&k.as_str()));
                prop_assert!(app.is_ok() || host.is_ok(), "an optional {} was needed", k);
            }
            line
        }
        Mutation::SetKey(i, v) => {
            let keys: Vec<String> = obj.keys().cloned().collect();
            obj.insert(i.get(&keys).clone(), v);
            serde_json::to_string(&obj).unwrap()
        }
        Mutation::AddUnknown(k, v) => {
            let known = k == "v"
                || k == "type"
                || required.contains(&k.as_str())
                || optional.contains(&k.as_str());
            obj.insert(k.clone(), v);
            let line = serde_json::to_string(&obj).unwrap();
            if !known {
                prop_assert!(
                    decode::<AppMessage>(&line).is_err() && decode::<HostMessage>(&line).is_err(),
                    "unknown field {:?} accepted: {}",
                    k,
                    line
                );
            }
            line
        }
        Mutation::SetVersion(v) => {
            obj.insert("v".into(), v.clone());
            let line = serde_json::to_string(&obj).unwrap();
            let app = decode::<AppMessage>(&line);
            let host = decode::<HostMessage>(&line);
            match v.as_u64() {
                Some(1) => prop_assert!(same(&line)),
                Some(n) => {
                    for r in [app.err(), host.err()] {
                        match r {
                            Some(AppProtocolError::Version(got)) if n <= u64::from(u32::MAX) => {
                                prop_assert_eq!(u64::from(got), n)
                            }
                            // Versions beyond u32 are reported truncated (`v as u32`).
                            Some(AppProtocolError::Version(_)) => {}
                            other => prop_assert!(false, "version {} gave {:?}", n, other),
                        }
                    }
                }
                None => {
                    prop_assert_eq!(app, Err(missing_v()));
                    prop_assert_eq!(host, Err(missing_v()));
                }
            }
            line
        }
        Mutation::RangeJunk(i, k, v) => {
            if let Some(Value::Array(ranges)) = obj.get_mut("ranges") {
                if !ranges.is_empty() {
                    let at = i.index(ranges.len());
                    if let Value::Object(r) = &mut ranges[at] {
                        r.insert(k.to_string(), v);
                    }
                }
            }
            serde_json::to_string(&obj).unwrap()
        }
        Mutation::Nested(in_array) => {
            let nested = if in_array {
                json!([obj])
            } else {
                json!({ "v": 1, "type": obj.get("type"), "body": obj })
            };
            let line = serde_json::to_string(&nested).unwrap();
            prop_assert!(decode::<AppMessage>(&line).is_err());
            prop_assert!(decode::<HostMessage>(&line).is_err());
            line
        }
    };
    decode_both(&line)
}

/// A deterministic stream of ranges from a seed (cheaper than a strategy per element when
/// there are tens of thousands).
fn ranges_from_seed(seed: u64, n: usize, huge: bool) -> Vec<PageRange> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            if huge {
                PageRange {
                    start: next(),
                    count: next(),
                }
            } else {
                PageRange {
                    start: next() % (1 << 24),
                    count: next() % 512,
                }
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        decode_both(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn arbitrary_strings_never_panic(s in prop_oneof![
        any::<String>(),
        r#"[{}\[\]":,0-9a-z \-.eE\\]{0,80}"#,
        r#"\{"v":1,"type":"(hello|inflated|deflate|state|target|ack|nack|refused)"[,:"a-z_0-9\-\[\]{}. ]{0,60}\}"#,
    ]) {
        decode_both(&s)?;
    }

    #[test]
    fn arbitrary_json_decodes_only_as_what_it_says(v in prop_oneof![arb_json(NAMES), message_like()]) {
        decode_both(&serde_json::to_string(&v).unwrap())?;
    }

    #[test]
    fn mutated_app_messages_decode_only_as_what_they_say(m in app_message(), mu in mutation(NAMES, true)) {
        let (_, required, optional) = app_shape(&m);
        let expected = m.clone();
        mutate_and_check(as_value(&m), (required, optional), mu, |line| {
            decode::<AppMessage>(line) == Ok(expected.clone())
        })?;
    }

    #[test]
    fn mutated_host_messages_decode_only_as_what_they_say(m in host_message(), mu in mutation(NAMES, true)) {
        let (_, required) = host_shape(&m);
        let expected = m.clone();
        mutate_and_check(as_value(&m), (required, &[]), mu, |line| {
            decode::<HostMessage>(line) == Ok(expected.clone())
        })?;
    }

    #[test]
    fn valid_app_messages_round_trip(m in app_message()) {
        let line = encode(&m);
        prop_assert!(line.ends_with('\n'));
        prop_assert_eq!(line.matches('\n').count(), 1, "one line: {:?}", line);
        prop_assert_eq!(decode::<AppMessage>(line.trim()), Ok(m));
        // An app message is never mistaken for a host message.
        prop_assert!(decode::<HostMessage>(line.trim()).is_err());
    }

    #[test]
    fn valid_host_messages_round_trip(m in host_message()) {
        let line = encode(&m);
        prop_assert!(line.ends_with('\n'));
        prop_assert_eq!(line.matches('\n').count(), 1, "one line: {:?}", line);
        prop_assert_eq!(decode::<HostMessage>(line.trim()), Ok(m));
        prop_assert!(decode::<AppMessage>(line.trim()).is_err());
    }
}

/// Very long range arrays (up to past the backend's per-message limit, small or huge numbers):
/// they decode to exactly what was sent while the line fits, and are refused once it does not.
#[test]
fn long_range_arrays_round_trip_or_are_too_long() {
    let strategy = (
        any::<u64>(),
        0..MAX_RANGES_PER_MESSAGE + 4096,
        any::<bool>(),
        any::<bool>(),
    );
    run_scaled(scaled(8, 2000), strategy, |(seed, n, huge, inflated)| {
        let ranges = ranges_from_seed(seed, n, huge);
        let m = if inflated {
            AppMessage::Inflated { seq: seed, ranges }
        } else {
            AppMessage::Deflate { seq: seed, ranges }
        };
        let line = encode(&m);
        let line = line.trim();
        if line.len() <= MAX_LINE_BYTES {
            prop_assert_eq!(decode::<AppMessage>(line), Ok(m));
        } else {
            prop_assert_eq!(
                decode::<AppMessage>(line),
                Err(AppProtocolError::TooLong(line.len()))
            );
        }
        Ok(())
    });
}

/// Around the limit: a valid message padded with whitespace (valid JSON) to just over
/// `MAX_LINE_BYTES` is refused with its length, and to just under is accepted.
#[test]
fn lines_over_the_limit_are_refused() {
    let strategy = (app_message(), 0usize..4096, 0usize..=100, any::<bool>());
    run_scaled(scaled(16, 1000), strategy, |(m, off, lead_pct, over)| {
        let body = encode(&m);
        let body = body.trim();
        let total = if over {
            MAX_LINE_BYTES + 1 + off
        } else {
            MAX_LINE_BYTES - off
        };
        let pad = total.saturating_sub(body.len());
        let lead = pad * lead_pct / 100;
        let line = format!("{}{body}{}", " ".repeat(lead), " ".repeat(pad - lead));
        if line.len() > MAX_LINE_BYTES {
            prop_assert_eq!(
                decode::<AppMessage>(&line),
                Err(AppProtocolError::TooLong(line.len()))
            );
            prop_assert_eq!(
                decode::<HostMessage>(&line),
                Err(AppProtocolError::TooLong(line.len()))
            );
        } else {
            prop_assert_eq!(decode::<AppMessage>(&line), Ok(m));
        }
        Ok(())
    });
}
