//! The scheduler's TOML configuration.

use crate::actuator::ActuatorConfig;
use crate::model::GuestSpec;
use crate::policy::PolicyConfig;
use balloon_protocol::config_file::{self, ConfigFileError};
pub use balloon_protocol::Size;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How much memory the guests may use together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// A fixed budget.
    pub bytes: Option<Size>,
    /// Or: the guests' current allocations plus host MemAvailable, minus this reserve.
    pub reserve: Option<Size>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DriverConfig {
    /// Our vhost-balloon-backend's control socket.
    Backend {
        control_socket: PathBuf,
        /// Which of the backend's mechanisms balloon the guest: "driver", "app", "both"
        /// (the driver first, the app for what it cannot take), or "auto" (the default:
        /// whatever the guest has).
        #[serde(default)]
        balloon: crate::drivers::split::BalloonMechanism,
    },
    /// QEMU's built-in virtio-balloon over QMP.
    Qmp {
        socket: PathBuf,
        /// QOM path of the balloon device (for its statistics).
        #[serde(default)]
        device: Option<String>,
        /// How often QEMU asks the guest for statistics (the device's
        /// `guest-stats-polling-interval`); 0 leaves it as it is. Default 5.
        #[serde(default)]
        stats_interval_seconds: Option<u64>,
    },
    /// cloud-hypervisor's REST API socket.
    CloudHypervisor { api_socket: PathBuf },
    /// A libvirt domain's balloon, through virsh (drivers/libvirt.rs).
    Libvirt {
        /// The libvirt connection URI, e.g. "qemu:///system".
        uri: String,
        domain: String,
        /// How often QEMU asks the guest for statistics (libvirt's balloon period); 0 leaves
        /// it as it is. Default 5.
        #[serde(default)]
        stats_interval_seconds: Option<u64>,
        /// The virsh program (default: `virsh` on PATH).
        #[serde(default)]
        virsh: Option<PathBuf>,
    },
}

/// `[[libvirt]]`: the running domains of a libvirt daemon become guests without a line each
/// (see discovery.rs). A domain named by a `[[guest]]` entry keeps that entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtDiscovery {
    pub uri: String,
    /// A regular expression a domain's name must match (anywhere in it: anchor it with ^...$).
    pub domains: Option<String>,
    /// Only domains that carry a metadata element in this XML namespace (`virsh metadata
    /// --uri`), e.g. one an orchestrator sets on the domains to balloon.
    pub metadata_uri: Option<String>,
    pub min: Option<Size>,
    pub max: Option<Size>,
    #[serde(default = "default_shares")]
    pub shares: u64,
    #[serde(default)]
    pub stats_interval_seconds: Option<u64>,
    #[serde(default)]
    pub virsh: Option<PathBuf>,
}

/// One guest: its sizes and shares, and the driver that moves its balloon. The simulator's
/// scenarios use the same entry with a modelled guest as the driver (`sim::ModelledGuest`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig<D = DriverConfig> {
    pub name: String,
    pub memory: Size,
    pub min: Option<Size>,
    pub max: Option<Size>,
    #[serde(default = "default_shares")]
    pub shares: u64,
    /// The `static` policy's size for this guest.
    #[serde(rename = "static")]
    pub static_size: Option<Size>,
    pub driver: D,
}

fn default_shares() -> u64 {
    1000
}

fn default_tick() -> f64 {
    2.0
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_tick")]
    pub tick_seconds: f64,
    /// How long a tick waits for the guests' drivers, all asked at once: reads get the first
    /// half, balloon writes the rest. A guest that has not answered by then is unreachable for
    /// that tick. Default: half of `tick_seconds`; at most `tick_seconds`.
    pub driver_deadline_seconds: Option<f64>,
    pub budget: BudgetConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub actuator: ActuatorConfig,
    /// The control API's Unix socket.
    pub api_socket: Option<PathBuf>,
    /// Prometheus metrics over HTTP (e.g. "127.0.0.1:9464"); off when absent.
    pub metrics_listen: Option<String>,
    /// The size at which the trace file (`--trace`) rotates (default 64M; 3 old files kept).
    pub trace_max: Option<Size>,
    #[serde(default, rename = "guest")]
    pub guests: Vec<GuestConfig>,
    /// Libvirt daemons whose domains are discovered at start (added to `guests`).
    #[serde(default)]
    pub libvirt: Vec<LibvirtDiscovery>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    File(#[from] ConfigFileError),
    #[error("{0}")]
    Parse(Box<toml::de::Error>),
    #[error("{0}")]
    Invalid(String),
}

impl<D> GuestConfig<D> {
    pub fn spec(&self) -> GuestSpec {
        GuestSpec::from_sizes(
            &self.name,
            self.memory.0,
            self.min.map(|s| s.0),
            self.max.map(|s| s.0),
            self.shares,
            self.static_size.map(|s| s.0),
        )
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Config = config_file::read(path)?;
        config.validate()?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the config as a whole; run again once discovered guests are added.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.tick_seconds.is_nan() || self.tick_seconds <= 0.0 {
            return bad(format!("tick_seconds {} must be > 0", self.tick_seconds));
        }
        if let Some(d) = self.driver_deadline_seconds {
            if d.is_nan() || d <= 0.0 || d > self.tick_seconds {
                return bad(format!(
                    "driver_deadline_seconds {d} must be > 0 and at most tick_seconds ({})",
                    self.tick_seconds
                ));
            }
        }
        if self.budget.bytes.is_some() == self.budget.reserve.is_some() {
            return bad("budget: give exactly one of `bytes` or `reserve`".into());
        }
        self.policy.validate().map_err(ConfigError::Invalid)?;
        for d in &self.libvirt {
            if let Some(pattern) = &d.domains {
                if let Err(e) = regex::Regex::new(pattern) {
                    return bad(format!("libvirt {}: domains {pattern:?}: {e}", d.uri));
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for g in &self.guests {
            if !names.insert(&g.name) {
                return bad(format!("guest {:?} appears twice", g.name));
            }
            let s = g.spec();
            if s.min_bytes > s.max_bytes {
                return bad(format!("guest {:?}: min exceeds max", g.name));
            }
            if s.memory_bytes == 0 {
                return bad(format!("guest {:?}: memory must be > 0", g.name));
            }
        }
        if let Some(budget) = self.budget.bytes {
            check_minimums(budget.0, &self.specs()).map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }

    /// How long a tick waits for the drivers.
    pub fn driver_deadline(&self) -> Duration {
        let seconds = self
            .driver_deadline_seconds
            .unwrap_or(self.tick_seconds / 2.0);
        Duration::try_from_secs_f64(seconds).unwrap_or(Duration::from_secs(1))
    }

    pub fn specs(&self) -> Vec<GuestSpec> {
        self.guests.iter().map(GuestConfig::spec).collect()
    }
}

/// A size for messages: whole MiB when it is one, else bytes.
pub fn show_size(bytes: u64) -> String {
    if bytes & ((1 << 20) - 1) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// A fixed budget must hold every guest's minimum; the error names the numbers.
pub fn check_minimums(budget: u64, guests: &[GuestSpec]) -> Result<(), String> {
    let total: u64 = guests.iter().map(GuestSpec::min_allocation).sum();
    if total <= budget {
        return Ok(());
    }
    let each: Vec<String> = guests
        .iter()
        .filter(|g| g.min_allocation() > 0)
        .map(|g| format!("{} {}", g.name, show_size(g.min_allocation())))
        .collect();
    Err(format!(
        "budget: {} cannot hold the guests' minimums, {} together ({}); \
         lower the minimums or raise the budget",
        show_size(budget),
        show_size(total),
        each.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_drivers_and_defaults() {
        let c = Config::parse(
            r#"
            tick_seconds = 1
            budget = { bytes = "1536M" }
            api_socket = "/run/s.sock"
            [policy]
            kind = "pressure"
            [[guest]]
            name = "a"
            memory = "1G"
            min = "256M"
            driver = { kind = "backend", control_socket = "/run/a.control" }
            [[guest]]
            name = "b"
            memory = 536870912
            max = "2G"
            shares = 2000
            driver = { kind = "qmp", socket = "/run/b.qmp", stats_interval_seconds = 2 }
            "#,
        )
        .unwrap();
        assert_eq!(
            c.guests[1].driver,
            DriverConfig::Qmp {
                socket: "/run/b.qmp".into(),
                device: None,
                stats_interval_seconds: Some(2)
            }
        );
        assert_eq!(c.budget.bytes, Some(Size(1536 << 20)));
        let s = c.specs();
        assert_eq!(s[0].min_bytes, 256 << 20);
        assert_eq!(s[0].max_bytes, 1 << 30);
        assert_eq!(s[0].shares, 1000);
        assert_eq!(
            s[1].max_bytes,
            512 << 20,
            "max is capped at the memory size"
        );
        assert_eq!(c.policy.kind, crate::policy::PolicyKind::Pressure);
        assert_eq!(c.policy.tax_rate, 0.75);
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/balloon-scheduler.toml"
        );
        let c = Config::load(Path::new(path)).unwrap();
        assert_eq!(c.guests.len(), 3);
        assert_eq!(c.specs()[1].static_bytes, Some(2 << 30));
    }

    const TWO_AT_1280M: &str = r#"
        [[guest]]
        name = "a"
        memory = "2G"
        min = "1280M"
        driver = { kind = "backend", control_socket = "/run/a.control" }
        [[guest]]
        name = "b"
        memory = "2G"
        min = "1280M"
        driver = { kind = "backend", control_socket = "/run/b.control" }
    "#;

    #[test]
    fn a_fixed_budget_below_the_minimums_is_an_error_naming_the_numbers() {
        let err = Config::parse(&format!("budget = {{ bytes = \"2G\" }}\n{TWO_AT_1280M}"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "budget: 2048 MiB cannot hold the guests' minimums, 2560 MiB together \
             (a 1280 MiB, b 1280 MiB); lower the minimums or raise the budget"
        );
        // Exactly the minimums is feasible; a dynamic budget is checked as it runs.
        Config::parse(&format!("budget = {{ bytes = \"2560M\" }}\n{TWO_AT_1280M}")).unwrap();
        Config::parse(&format!("budget = {{ reserve = \"2G\" }}\n{TWO_AT_1280M}")).unwrap();
        let e = check_minimums(
            (2560 << 20) - 1,
            &Config::parse(&format!("budget = {{ reserve = \"2G\" }}\n{TWO_AT_1280M}"))
                .unwrap()
                .specs(),
        )
        .unwrap_err();
        assert!(e.starts_with("budget: 2684354559 bytes cannot hold"), "{e}");
    }

    #[test]
    fn the_driver_deadline_follows_the_tick_unless_set() {
        let c = Config::parse("tick_seconds = 3\nbudget = { bytes = 1 }").unwrap();
        assert_eq!(c.driver_deadline(), Duration::from_millis(1500));
        let c = Config::parse("driver_deadline_seconds = 0.25\nbudget = { bytes = 1 }").unwrap();
        assert_eq!(c.driver_deadline(), Duration::from_millis(250));
    }

    #[test]
    fn bad_configs_say_why() {
        for (text, want) in [
            ("budget = {}", "exactly one"),
            ("budget = { bytes = \"1Q\" }", "invalid size"),
            ("budget = { bytes = 1 }\ntick_seconds = 0", "tick_seconds"),
            (
                "budget = { bytes = 1 }\n[[guest]]\nname=\"a\"\nmemory=\"1G\"\nmin=\"2G\"\ndriver={kind=\"backend\",control_socket=\"/x\"}",
                "min exceeds max",
            ),
            ("budget = { bytes = 1 }\nbogus = 1", "unknown field"),
            (
                "budget = { bytes = 1 }\ntick_seconds = 2\ndriver_deadline_seconds = 3",
                "driver_deadline_seconds 3 must be > 0 and at most tick_seconds (2)",
            ),
            (
                "budget = { bytes = 1 }\n[[guest]]\nname=\"a\"\nmemory=\"1G\"\ndriver={kind=\"vmware\"}",
                "unknown variant",
            ),
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
