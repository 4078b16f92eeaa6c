//! Drivers move one guest's balloon and read its figures. The scheduler speaks only sizes and
//! statistics through them, never page numbers.

use serde::{Deserialize, Serialize};

/// A guest's cumulative counters and memory figures, as its driver reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RawGuestStats {
    pub available_bytes: u64,
    pub total_bytes: u64,
    /// Cumulative since guest boot (pages / events); the daemon turns them into deltas.
    pub swap_in: u64,
    pub major_faults: u64,
    /// Seconds since the guest produced these figures, when the driver knows.
    pub age_seconds: Option<f64>,
}

/// One reading of a guest's balloon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DriverReading {
    /// Balloon size asked for, in bytes; `None` where the VMM cannot tell (QEMU's built-in
    /// balloon reports only the actual size).
    pub target_bytes: Option<u64>,
    /// Balloon size reached, in bytes.
    pub actual_bytes: u64,
    pub stats: Option<RawGuestStats>,
    /// How the balloon is split between our backend's driver and app (None elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<split::BalloonSplit>,
    /// The guest's own word for its balloon disagrees with what the host holds back: the
    /// reading carries the host's figure (our backend's tracked pages), the word is not used.
    /// The engine also sets it for a reading outside the guest's configured memory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub size_disputed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Protocol(String),
    #[error("the VMM refused: {0}")]
    Refused(String),
}

/// One guest's balloon, whatever implements it.
pub trait BalloonDriver: Send {
    /// Reads the balloon's target and actual size and the guest's statistics.
    fn read(&mut self) -> Result<DriverReading, DriverError>;
    /// Asks for a balloon of `balloon_bytes`.
    fn set_balloon(&mut self, balloon_bytes: u64) -> Result<(), DriverError>;
    /// For logs and status: the driver kind and its address.
    fn describe(&self) -> String;
}

pub mod backend;
pub mod cloud_hypervisor;
// The fakes serve tests and benchmarks only: not in the production library unless the
// `fakes` feature asks for them (the benchmarks' crate does).
#[cfg(any(test, feature = "fakes"))]
pub mod fake_backend;
#[cfg(any(test, feature = "fakes"))]
pub mod fake_ch;
pub mod http;
pub mod libvirt;
pub mod pool;
pub mod qmp;
pub mod split;
pub mod unix;
pub mod virsh;

use crate::config::DriverConfig;

/// Builds a guest's driver from its config. Connections are made lazily, so a guest whose VMM
/// is not up yet is reported unreachable instead of stopping the scheduler.
pub fn from_config(config: &DriverConfig, memory_bytes: u64) -> Box<dyn BalloonDriver> {
    match config {
        DriverConfig::Backend {
            control_socket,
            balloon,
        } => Box::new(backend::BackendDriver::new(control_socket.clone()).with_mechanism(*balloon)),
        DriverConfig::Qmp {
            socket,
            device,
            stats_interval_seconds,
        } => Box::new(
            qmp::QmpDriver::new(socket.clone(), device.clone(), memory_bytes).with_stats_interval(
                stats_interval_seconds.unwrap_or(qmp::DEFAULT_STATS_INTERVAL_SECONDS),
            ),
        ),
        DriverConfig::CloudHypervisor { api_socket } => Box::new(
            cloud_hypervisor::CloudHypervisorDriver::new(api_socket.clone()),
        ),
        DriverConfig::Libvirt {
            uri,
            domain,
            stats_interval_seconds,
            virsh,
        } => Box::new(
            libvirt::LibvirtDriver::new(virsh::Virsh::new(uri, virsh.as_deref()), domain.clone())
                .with_stats_interval(
                    stats_interval_seconds.unwrap_or(libvirt::DEFAULT_STATS_INTERVAL_SECONDS),
                ),
        ),
    }
}
