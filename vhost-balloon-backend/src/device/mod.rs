//! The virtio-balloon device model, free of vhost-user: features, config space, queue layout,
//! and parsing of what the guest driver puts in the queues. Pure functions over bytes, so each
//! piece is tested (and fuzzed) on its own.

pub mod config;
pub mod features;
pub mod pfn;
pub mod queues;
pub mod stats;

pub use config::BalloonConfig;
pub use queues::{QueueKind, QueueLayout};

/// The virtio device id of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
