//! The VM harness shared by the integration tests, the demo and the benchmarks: QEMU 11 from the
//! lab's trixie rootfs under TCG (KVM only when asked), guest images, a QMP client, a test agent
//! in the guest, host-side memory figures, and waiting with deadlines.
//!
//! The lab is provisioned by `scripts/lab.sh` (called by `make test`); the harness only checks
//! that it is there and names what is missing.

pub mod agent;
pub mod agent_proto;
pub mod backend;
pub mod bench;
pub mod demo;
pub mod error;
pub mod flood;
pub mod frontend;
pub mod host;
pub mod hugepages;
pub mod lab;
pub mod libvirt;
pub mod policy_vm;
pub mod qmp;
pub mod scheduler;
pub mod vm;
pub mod wait;
pub mod workload;

pub use error::LabError;
pub use vm::{BuiltinBalloon, GuestRam, Image, VhostUserBalloon, Vm, VmConfig};

pub type Result<T> = std::result::Result<T, LabError>;

/// Mebibytes to bytes.
pub const MIB: u64 = 1 << 20;
