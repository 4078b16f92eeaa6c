//! Arbitrary JSON for the fuzz targets of the JSON-lines protocols: any value, nested a few
//! levels, with a protocol's own field names and tags as likely keys and strings.
// Each target uses its part (the control protocol has no page ranges to mutate).
#![allow(dead_code)]

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde_json::{json, Value};

/// A protocol's names: its field names, and the values its tag (`type`, `cmd`) takes.
#[derive(Clone, Copy)]
pub struct Names {
    pub fields: &'static [&'static str],
    pub tags: &'static [&'static str],
}

pub fn key(names: Names) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(names.fields).prop_map(str::to_string),
        1 => "[a-z_]{1,10}",
        1 => any::<String>(),
    ]
}

/// Numbers, with the edges a decoder may get wrong more likely.
pub fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from), // NaN and infinities become null
        proptest::sample::select(vec![
            json!(0),
            json!(1),
            json!(2),
            json!(-1),
            json!(1.0),
            json!(1.5),
            json!(u32::MAX),
            json!(u64::from(u32::MAX) + 1),
            json!(u64::MAX),
            json!(1e300),
            json!(-0.0),
        ]),
    ]
}

pub fn leaf(names: Names) -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        proptest::sample::select(names.tags).prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ]
}

/// Any JSON value.
pub fn arb_json(names: Names) -> impl Strategy<Value = Value> {
    leaf(names).prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(Value::Array),
            btree_map(key(names), inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A structured change to a valid message.
#[derive(Debug, Clone)]
pub enum Mutation {
    Nothing,
    /// Reformatted: pretty-printed JSON, same content.
    Pretty,
    RemoveKey(prop::sample::Index),
    SetKey(prop::sample::Index, Value),
    /// A field the message does not have.
    AddUnknown(String, Value),
    SetVersion(Value),
    /// Junk in one range of an inflated/deflate (wrong types, negative, huge, nested).
    RangeJunk(prop::sample::Index, &'static str, Value),
    /// The message nested in an array or another object.
    Nested(bool),
}

/// Mutations of a message of the protocol `names` describes; `ranges` when its messages
/// carry page ranges.
pub fn mutation(names: Names, ranges: bool) -> BoxedStrategy<Mutation> {
    let common = prop_oneof![
        Just(Mutation::Nothing),
        Just(Mutation::Pretty),
        any::<prop::sample::Index>().prop_map(Mutation::RemoveKey),
        (any::<prop::sample::Index>(), arb_json(names)).prop_map(|(i, v)| Mutation::SetKey(i, v)),
        (
            prop_oneof![
                proptest::sample::select(names.fields).prop_map(str::to_string),
                "[a-z_]{1,10}"
            ],
            arb_json(names)
        )
            .prop_map(|(k, v)| Mutation::AddUnknown(k, v)),
        prop_oneof![number(), arb_json(names)].prop_map(Mutation::SetVersion),
        any::<bool>().prop_map(Mutation::Nested),
    ];
    if !ranges {
        return common.boxed();
    }
    let range_junk = (
        any::<prop::sample::Index>(),
        proptest::sample::select(vec!["start", "count", "junk"]),
        arb_json(names),
    )
        .prop_map(|(i, k, v)| Mutation::RangeJunk(i, k, v));
    prop_oneof![7 => common, 1 => range_junk].boxed()
}
