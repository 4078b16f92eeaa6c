//! Wire types shared by the balloon backend and its clients (the scheduler, `balloonctl`, the
//! guest app), so both ends use one definition. The control protocol is JSON, one object per
//! line, each with a `version` field.

pub mod app;
pub mod bench;
pub mod client;
pub mod config_file;
pub mod control;
pub mod daemon;
pub mod lines;
pub mod socket;
pub mod units;

pub use client::ControlClient;
pub use control::{
    AppStatus, BackendStatus, ControlReply, ControlRequest, GuestStatsSnapshot, RejectedInput,
    CONTROL_PROTOCOL_VERSION,
};
pub use units::{bytes_to_pages, pages_to_bytes, parse_size, Size, PAGE_SIZE};
