//! A real libvirtd for the tests (scripts/libvirtd-lab.sh: Debian's daemon in a private mount
//! namespace, its state in a run directory) and domains defined from the XML files in
//! examples/libvirt/, booting the mini image under TCG with the lab's QEMU 11.

use crate::agent::Agent;
use crate::error::IoContext;
use crate::lab;
use crate::wait::{wait_for, Poll};
use crate::{LabError, Result};
use scheduler::drivers::libvirt::parse_dommemstat;
use scheduler::drivers::virsh::Virsh;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const STOCK_BALLOON_XML: &str = include_str!("../../examples/libvirt/balloon-domain.xml");
pub const VHOST_BALLOON_XML: &str = include_str!("../../examples/libvirt/vhost-balloon-domain.xml");

/// The running daemon; stopped (its domains destroyed first) on drop.
pub struct Libvirtd {
    pub dir: PathBuf,
    /// The connection URI for virsh and the scheduler.
    pub uri: String,
    child: Child,
}

/// virsh against the daemon at `uri`, through the scheduler's runner (deadline included).
fn virsh_at(uri: &str, args: &[&str]) -> Result<String> {
    Virsh::new(uri, None)
        .run(args)
        .map_err(|e| LabError::Other(format!("virsh {}: {e}", args.join(" "))))
}

impl Libvirtd {
    pub fn start(name: &str) -> Result<Libvirtd> {
        if !Path::new("/usr/sbin/libvirtd").exists() {
            return Err(LabError::Other(
                "libvirtd is not installed: run `scripts/lab.sh host`".into(),
            ));
        }
        let dir = lab::run_dir(&format!("{name}-libvirtd"))?;
        let log = std::fs::File::create(dir.join("libvirtd.out")).ctx(|| "libvirtd.out".into())?;
        let mut cmd = Command::new(lab::repo_root().join("scripts/libvirtd-lab.sh"));
        cmd.arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().ctx(|| "libvirtd.out".into())?)
            .stderr(log);
        // The script execs down to libvirtd itself: it dies with the test.
        lab::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .ctx(|| "starting scripts/libvirtd-lab.sh".into())?;
        let uri = format!("qemu:///system?socket={}/sock/libvirt-sock", dir.display());
        let mut d = Libvirtd { dir, uri, child };
        wait_for(
            "libvirtd to answer",
            Duration::from_secs(60),
            Duration::from_millis(50),
            || {
                if let Some(status) = d.child.try_wait().ctx(|| "libvirtd".into())? {
                    return Err(LabError::Other(format!(
                        "libvirtd exited ({status}): {}",
                        std::fs::read_to_string(d.dir.join("libvirtd.out")).unwrap_or_default()
                    )));
                }
                Ok(match virsh_at(&d.uri, &["list", "--name"]) {
                    Ok(_) => Poll::Ready(()),
                    Err(e) => Poll::Pending(e.to_string()),
                })
            },
        )?;
        Ok(d)
    }

    /// Runs virsh against this daemon; its output, or an error with virsh's message.
    pub fn virsh(&self, args: &[&str]) -> Result<String> {
        virsh_at(&self.uri, args)
    }

    /// Defines and starts a domain from one of examples/libvirt/'s files and waits for its
    /// guest agent. `balloon_socket`: our backend's vhost-user socket (VHOST_BALLOON_XML).
    pub fn boot(
        &self,
        xml: &str,
        name: &str,
        mem_mib: u64,
        balloon_socket: Option<&Path>,
    ) -> Result<Domain> {
        let mini = lab::lab_dir().join("images/mini");
        let run_dir = lab::run_dir(name)?;
        let vars = [
            ("name", name.to_string()),
            ("mem_mib", mem_mib.to_string()),
            ("emulator", lab::qemu_binary()?.display().to_string()),
            ("kernel", mini.join("vmlinuz").display().to_string()),
            ("initrd", mini.join("initrd.cpio").display().to_string()),
            (
                "cmdline",
                "console=ttyS0 panic=-1 loglevel=4 lab.modules=virtio_balloon".into(),
            ),
            ("serial", run_dir.join("serial.log").display().to_string()),
            (
                "agent_socket",
                run_dir.join("agent.sock").display().to_string(),
            ),
            (
                "balloon_socket",
                balloon_socket.map_or(String::new(), |p| p.display().to_string()),
            ),
        ];
        let text = vars.iter().fold(xml.to_string(), |t, (k, v)| {
            t.replace(&format!("{{{k}}}"), v)
        });
        let file = run_dir.join("domain.xml");
        std::fs::write(&file, text).ctx(|| "writing domain.xml".into())?;
        self.virsh(&["define", &file.display().to_string()])?;
        let mut domain = Domain {
            name: name.to_string(),
            uri: self.uri.clone(),
            run_dir,
            agent: None,
        };
        self.virsh(&["start", name])?;
        let sock = domain.run_dir.join("agent.sock");
        let mut agent = wait_for(
            "the domain's agent socket",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || {
                Ok(match Agent::connect(&sock) {
                    Ok(a) => Poll::Ready(a),
                    Err(e) => Poll::Pending(e.to_string()),
                })
            },
        )?;
        wait_for(
            "the guest agent to answer",
            Duration::from_secs(120),
            Duration::from_millis(200),
            || {
                Ok(match agent.run_timeout("true", Duration::from_secs(2)) {
                    Ok(out) if out.success() => Poll::Ready(()),
                    other => Poll::Pending(format!(
                        "{other:?}; serial: {}",
                        std::fs::read_to_string(domain.run_dir.join("serial.log"))
                            .unwrap_or_default()
                    )),
                })
            },
        )?;
        domain.agent = Some(agent);
        Ok(domain)
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        // libvirtd leaves its guests running when it stops.
        if let Ok(names) = self.virsh(&["list", "--name"]) {
            for name in names.lines().filter(|l| !l.trim().is_empty()) {
                let _ = self.virsh(&["destroy", name.trim()]);
            }
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A running domain; destroyed and undefined on drop.
pub struct Domain {
    pub name: String,
    uri: String,
    pub run_dir: PathBuf,
    agent: Option<Agent>,
}

impl Domain {
    pub fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("booted domains have an agent")
    }

    /// `virsh dommemstat`: name -> value (KiB, or counts).
    pub fn memstat(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let out = virsh_at(&self.uri, &["dommemstat", &self.name])?;
        Ok(parse_dommemstat(&out)
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect())
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh_at(&self.uri, &["destroy", &self.name]);
        let _ = virsh_at(&self.uri, &["undefine", &self.name]);
    }
}
