//! libvirt through its `virsh` command: one process per request, with a deadline.
//!
//! Why a command and not the library: libvirt's Rust bindings (the `virt` crate) are LGPL-2.1
//! and Rust links them statically into this Apache-2.0 binary, and they need libvirt's headers
//! to build; `virsh` keeps the licences apart, needs nothing at build time, and speaks the same
//! remote protocol to the same daemon as every other libvirt client (its output formats used
//! here, `domstats` key=value lines and `list --name`, are meant for scripts). The cost is a
//! process per request: a few milliseconds each, measured in the libvirt VM test.
//!
//! A daemon that stops answering must not hold the scheduler: each command is killed at its
//! deadline (`DEFAULT_TIMEOUT`), and its output is read up to `MAX_OUTPUT` bytes.

use super::DriverError;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use wait_timeout::ChildExt;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most output read from one command (domstats of a few hundred domains fits).
const MAX_OUTPUT: u64 = 4 << 20;

/// How to reach one libvirt daemon.
#[derive(Debug, Clone)]
pub struct Virsh {
    pub program: PathBuf,
    pub uri: String,
    pub timeout: Duration,
}

fn io(what: &str, source: std::io::Error) -> DriverError {
    DriverError::Io {
        what: what.to_string(),
        source,
    }
}

/// Reads a child's pipe to its end (at most `MAX_OUTPUT` bytes) on a thread of its own.
fn read_beside(pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = pipe.take(MAX_OUTPUT).read_to_end(&mut out);
        out
    })
}

impl Virsh {
    /// A daemon at `uri`, reached with `program` (default: `virsh` on PATH).
    pub fn new(uri: &str, program: Option<&Path>) -> Self {
        Virsh {
            program: program.map_or_else(|| PathBuf::from("virsh"), Path::to_path_buf),
            uri: uri.to_string(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Runs `virsh -c URI ARGS...` and returns its standard output; a failure carries virsh's
    /// own message.
    pub fn run(&self, args: &[&str]) -> Result<String, DriverError> {
        let what = format!("virsh {}", args.first().copied().unwrap_or(""));
        let mut child = Command::new(&self.program)
            .arg("--quiet")
            .arg("--connect")
            .arg(&self.uri)
            .args(args)
            // Untranslated messages, and no pager or editor: output for a program.
            .env("LC_ALL", "C")
            .env_remove("VIRSH_DEFAULT_CONNECT_URI")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io(&format!("starting {}", self.program.display()), e))?;
        // Read both pipes beside the wait, so a full pipe cannot stall the child.
        let stdout = child.stdout.take().map(read_beside);
        let stderr = child.stderr.take().map(read_beside);
        let status = match child.wait_timeout(self.timeout) {
            Ok(Some(status)) => status,
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(DriverError::Io {
                    what,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer in {:?}", self.timeout),
                    ),
                });
            }
            Err(e) => return Err(io(&what, e)),
        };
        let collect = |reader: Option<std::thread::JoinHandle<Vec<u8>>>| {
            reader
                .and_then(|h| h.join().ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let (stdout, stderr) = (collect(stdout), collect(stderr));
        if status.success() {
            Ok(stdout)
        } else {
            Err(DriverError::Refused(format!(
                "{what} ({status}): {}",
                stderr.trim().trim_start_matches("error: ")
            )))
        }
    }

    /// The domain's memory in KiB (`virsh domstats --balloon`: `balloon.maximum`); `None` for
    /// a domain without a balloon.
    pub fn memory_kib(&self, domain: &str) -> Result<Option<u64>, DriverError> {
        let out = self.run(&["domstats", "--balloon", "--", domain])?;
        Ok(parse_domstats(&out)
            .first()
            .and_then(|(_, stats)| stats.get("balloon.maximum")?.trim().parse().ok()))
    }

    /// The names of the running domains.
    pub fn running_domains(&self) -> Result<Vec<String>, DriverError> {
        let out = self.run(&["list", "--name", "--state-running"])?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// The domain's metadata element in namespace `uri`, if it has one.
    pub fn metadata(&self, domain: &str, uri: &str) -> Result<Option<String>, DriverError> {
        match self.run(&["metadata", "--uri", uri, "--", domain]) {
            Ok(xml) => Ok(Some(xml)),
            // "metadata not found: Requested metadata element is not present"
            Err(DriverError::Refused(e)) if e.contains("metadata not found") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Splits `virsh domstats` output (`Domain: 'NAME'` then indented `key=value` lines) into each
/// domain's figures.
pub fn parse_domstats(out: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let mut domains: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    for line in out.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("Domain: ") {
            let name = name.trim_matches('\'').to_string();
            domains.push((name, BTreeMap::new()));
        } else if let (Some((key, value)), Some((_, stats))) =
            (line.split_once('='), domains.last_mut())
        {
            stats.insert(key.to_string(), value.to_string());
        }
    }
    domains
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domstats_output_splits_into_domains_and_figures() {
        let out = "Domain: 'web-1'\n  balloon.current=786432\n  balloon.maximum=1048576\n\n\
                   Domain: 'db'\n  balloon.current=1048576\n  balloon.rss=40000\n";
        let d = parse_domstats(out);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].0, "web-1");
        assert_eq!(d[0].1["balloon.current"], "786432");
        assert_eq!(d[1].0, "db");
        assert_eq!(d[1].1.len(), 2);
        // Garbage before any domain, or lines without '=', are ignored.
        assert!(parse_domstats("x=1\nnothing here\n").is_empty());
    }

    fn script(body: &str) -> (tempfile::TempDir, Virsh) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("virsh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut v = Virsh::new("test:///default", Some(&path));
        v.timeout = Duration::from_millis(500);
        (dir, v)
    }

    #[test]
    fn a_virsh_that_hangs_is_killed_at_the_deadline_and_errors_carry_its_message() {
        let (_d, v) = script("exec sleep 30");
        let t = std::time::Instant::now();
        let e = v.run(&["list"]).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert!(e.to_string().contains("no answer"), "{e}");

        let (_d, v) = script("echo \"error: failed to get domain 'x'\" >&2; exit 1");
        let e = v.run(&["domstats"]).unwrap_err();
        assert!(matches!(e, DriverError::Refused(_)), "{e}");
        assert!(e.to_string().contains("failed to get domain 'x'"), "{e}");

        // The arguments arrive as given, after the connection.
        let (_d, v) = script("echo \"$@\"");
        assert_eq!(
            v.run(&["setmem", "--", "a b"]).unwrap().trim(),
            "--quiet --connect test:///default setmem -- a b"
        );
    }
}
