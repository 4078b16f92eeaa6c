//! The scheduler's TOML configuration.

use crate::actuator::ActuatorConfig;
use crate::model::GuestSpec;
use crate::policy::PolicyConfig;
use balloon_protocol::parse_size;
use serde::{Deserialize, Deserializer};
use std::path::{Path, PathBuf};

/// A size in bytes written as a number or a string with a suffix ("512M", "1.5G").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Size(n)),
            Raw::Text(t) => parse_size(&t).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

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
    Backend { control_socket: PathBuf },
    /// QEMU's built-in virtio-balloon over QMP.
    Qmp {
        socket: PathBuf,
        /// QOM path of the balloon device (for its statistics).
        #[serde(default)]
        device: Option<String>,
    },
    /// cloud-hypervisor's REST API socket.
    CloudHypervisor { api_socket: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    pub name: String,
    pub memory: Size,
    pub min: Option<Size>,
    pub max: Option<Size>,
    #[serde(default = "default_shares")]
    pub shares: u64,
    /// The `static` policy's size for this guest.
    #[serde(rename = "static")]
    pub static_size: Option<Size>,
    pub driver: DriverConfig,
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
    pub budget: BudgetConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub actuator: ActuatorConfig,
    /// The control API's Unix socket.
    pub api_socket: Option<PathBuf>,
    /// Prometheus metrics over HTTP (e.g. "127.0.0.1:9464"); off when absent.
    pub metrics_listen: Option<String>,
    #[serde(default, rename = "guest")]
    pub guests: Vec<GuestConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

impl GuestConfig {
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
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.into(),
                source,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.tick_seconds.is_nan() || self.tick_seconds <= 0.0 {
            return bad(format!("tick_seconds {} must be > 0", self.tick_seconds));
        }
        if self.budget.bytes.is_some() == self.budget.reserve.is_some() {
            return bad("budget: give exactly one of `bytes` or `reserve`".into());
        }
        self.policy.validate().map_err(ConfigError::Invalid)?;
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
        Ok(())
    }

    pub fn specs(&self) -> Vec<GuestSpec> {
        self.guests.iter().map(GuestConfig::spec).collect()
    }
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
            driver = { kind = "qmp", socket = "/run/b.qmp" }
            "#,
        )
        .unwrap();
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
                "budget = { bytes = 1 }\n[[guest]]\nname=\"a\"\nmemory=\"1G\"\ndriver={kind=\"vmware\"}",
                "unknown variant",
            ),
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
