//! Guests found rather than listed: `[[libvirt]]` sections turn a daemon's running domains into
//! guests, so an operator with thirty domains writes no line per guest.
//!
//! ```toml
//! [[libvirt]]
//! uri = "qemu:///system"
//! domains = "^web-"                                 # optional: a pattern on the names
//! metadata_uri = "http://example.org/balloon/1.0"   # optional: only domains marked so
//! min = "512M"
//! shares = 1000
//! ```
//!
//! Each domain found becomes a guest of its own name with the libvirt driver, its memory the
//! domain's maximum (`balloon.maximum`), min, max and shares from the section. A domain that a
//! `[[guest]]` entry names keeps that entry; a name found twice (two daemons) is taken once,
//! from the first section, and the other logged. Discovery runs when the scheduler starts: a
//! daemon that cannot be reached then is logged and its domains are left out.

use crate::config::{Config, DriverConfig, GuestConfig, LibvirtDiscovery, Size};
use crate::drivers::virsh::Virsh;
use crate::drivers::DriverError;
use regex::Regex;

/// The guest entry for domain `name` of `section`, whose memory is `memory_bytes`.
fn guest_for(section: &LibvirtDiscovery, name: &str, memory_bytes: u64) -> GuestConfig {
    GuestConfig {
        name: name.to_string(),
        memory: Size(memory_bytes),
        min: section.min,
        max: section.max,
        shares: section.shares,
        static_size: None,
        driver: DriverConfig::Libvirt {
            uri: section.uri.clone(),
            domain: name.to_string(),
            stats_interval_seconds: section.stats_interval_seconds,
            virsh: section.virsh.clone(),
        },
    }
}

/// The domains of one section, as guests (those not already `taken`).
fn discover_section(
    section: &LibvirtDiscovery,
    taken: &[String],
) -> Result<Vec<GuestConfig>, DriverError> {
    let virsh = Virsh::new(&section.uri, section.virsh.as_deref());
    // Checked when the config was read.
    let pattern = section
        .domains
        .as_deref()
        .map(Regex::new)
        .transpose()
        .map_err(|e| DriverError::Protocol(e.to_string()))?;
    let mut found = Vec::new();
    for name in virsh.running_domains()? {
        if taken.contains(&name) || pattern.as_ref().is_some_and(|p| !p.is_match(&name)) {
            continue;
        }
        if let Some(ns) = &section.metadata_uri {
            if virsh.metadata(&name, ns)?.is_none() {
                continue;
            }
        }
        let Some(max_kib) = virsh.memory_kib(&name)? else {
            log::warn!(
                "libvirt {}: domain {name} has no balloon (balloon.maximum): left out",
                section.uri
            );
            continue;
        };
        found.push(guest_for(section, &name, max_kib.saturating_mul(1024)));
    }
    Ok(found)
}

/// Adds the discovered domains to `config.guests`, then checks the whole config again (a fixed
/// budget must still hold every minimum). Returns how many were added.
pub fn add_discovered(config: &mut Config) -> Result<usize, crate::config::ConfigError> {
    let mut added = 0;
    for section in config.libvirt.clone() {
        let taken: Vec<String> = config.guests.iter().map(|g| g.name.clone()).collect();
        match discover_section(&section, &taken) {
            Ok(guests) => {
                for g in &guests {
                    log::info!(
                        "libvirt {}: domain {} ({} MiB) is a guest",
                        section.uri,
                        g.name,
                        g.memory.0 >> 20
                    );
                }
                added += guests.len();
                config.guests.extend(guests);
            }
            Err(e) => log::error!(
                "libvirt {}: discovery failed ({e}); its domains are left out",
                section.uri
            ),
        }
    }
    config.validate()?;
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A virsh that knows three running domains: web-1 and web-2 (web-2 marked with metadata)
    /// and db, which also has a `[[guest]]` entry.
    fn fake_virsh(dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("virsh");
        let script = r#"#!/bin/sh
# --quiet --connect URI COMMAND ...
shift 3
case "$1" in
list) printf 'web-1\nweb-2\ndb\n\n' ;;
metadata) for last; do :; done
  [ "$last" = web-2 ] && { echo '<m/>'; exit 0; }
  echo "error: metadata not found: Requested metadata element is not present" >&2; exit 1 ;;
domstats) for last; do :; done
  printf "Domain: '%s'\n  balloon.current=524288\n  balloon.maximum=1048576\n" "$last" ;;
*) exit 2 ;;
esac
"#;
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn config(dir: &std::path::Path, section: &str) -> Config {
        Config::parse(&format!(
            r#"
            budget = {{ bytes = "8G" }}
            [[guest]]
            name = "db"
            memory = "2G"
            driver = {{ kind = "backend", control_socket = "/x" }}
            [[libvirt]]
            uri = "test:///default"
            virsh = "{}"
            min = "256M"
            {section}
            "#,
            fake_virsh(dir).display()
        ))
        .unwrap()
    }

    fn names(c: &Config) -> Vec<&str> {
        c.guests.iter().map(|g| g.name.as_str()).collect()
    }

    #[test]
    fn running_domains_become_guests_unless_listed_filtered_or_unmarked() {
        let dir = tempfile::tempdir().unwrap();
        let mut all = config(dir.path(), "");
        assert_eq!(add_discovered(&mut all).unwrap(), 2);
        assert_eq!(names(&all), ["db", "web-1", "web-2"]);
        let web = &all.guests[1];
        assert_eq!(web.memory.0, 1 << 30);
        assert_eq!(web.min.map(|s| s.0), Some(256 << 20));
        assert!(matches!(&web.driver, DriverConfig::Libvirt { domain, .. } if domain == "web-1"));
        // The listed one keeps its entry.
        assert!(matches!(all.guests[0].driver, DriverConfig::Backend { .. }));

        let mut by_name = config(dir.path(), r#"domains = "-1$""#);
        add_discovered(&mut by_name).unwrap();
        assert_eq!(names(&by_name), ["db", "web-1"]);

        let mut marked = config(dir.path(), r#"metadata_uri = "http://example.org/b""#);
        add_discovered(&mut marked).unwrap();
        assert_eq!(names(&marked), ["db", "web-2"]);
    }

    #[test]
    fn an_unreachable_daemon_leaves_its_domains_out_and_a_bad_pattern_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path(), "");
        c.libvirt[0].virsh = Some(dir.path().join("no-such-virsh"));
        assert_eq!(add_discovered(&mut c).unwrap(), 0);
        assert_eq!(names(&c), ["db"]);

        let e = Config::parse(
            "budget = { bytes = \"1G\" }\n[[libvirt]]\nuri = \"x\"\ndomains = \"(\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("domains"), "{e}");
    }

    #[test]
    fn discovered_minimums_count_against_a_fixed_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path(), "");
        c.budget.bytes = Some(Size(1536 << 20));
        c.libvirt[0].min = Some(Size(1 << 30));
        let e = add_discovered(&mut c).unwrap_err();
        assert!(e.to_string().contains("budget"), "{e}");
    }
}
