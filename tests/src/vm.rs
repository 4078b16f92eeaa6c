//! One QEMU 11 guest: command line, start, readiness, teardown.

use crate::agent::Agent;
use crate::agent_proto::AGENT_PORT_NAME;
use crate::error::IoContext;
use crate::host::{self, ProcMemory};
use crate::hugepages::HugetlbfsMount;
use crate::lab;
use crate::qmp::Qmp;
use crate::wait::{wait_for, Poll};
use crate::{LabError, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The guest images `scripts/lab.sh` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// Kernel + busybox initramfs: boots in about 3 s under TCG.
    Mini,
    /// Debian trixie with systemd on an ext4 disk: about 8 s under TCG. Built on first use.
    Debian,
}

impl Image {
    fn dir(self) -> PathBuf {
        lab::lab_dir().join("images").join(match self {
            Image::Mini => "mini",
            Image::Debian => "debian",
        })
    }

    /// Builds the Debian image on demand (only some tests need it), once per process so it
    /// carries the current guest binaries.
    fn ensure(self) -> Result<()> {
        static DEBIAN: std::sync::OnceLock<std::result::Result<(), String>> =
            std::sync::OnceLock::new();
        if self != Image::Debian {
            return Ok(());
        }
        DEBIAN
            .get_or_init(|| {
                let status = Command::new(lab::repo_root().join("scripts/lab.sh"))
                    .arg("debian")
                    .status()
                    .map_err(|e| format!("running scripts/lab.sh debian: {e}"))?;
                if status.success() {
                    Ok(())
                } else {
                    Err(format!("scripts/lab.sh debian failed ({status})"))
                }
            })
            .clone()
            .map_err(LabError::Other)
    }
}

/// QEMU's own `virtio-balloon-pci`.
#[derive(Debug, Clone, Default)]
pub struct BuiltinBalloon {
    pub free_page_reporting: bool,
    pub deflate_on_oom: bool,
}

/// Our device: `vhost-user-test-device-pci` with virtio-id 5 on a backend's socket, with the
/// command line from examples/qemu/vhost-balloon.args.
#[derive(Debug, Clone)]
pub struct VhostUserBalloon {
    pub socket: PathBuf,
}

/// What backs guest RAM (always shared memory, which a vhost-user backend can map).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GuestRam {
    /// A memfd of base pages (examples/qemu/guest-ram.args).
    #[default]
    Memfd,
    /// A memfd on 2 MiB huge pages (examples/qemu/guest-ram-hugetlb.args); reserve them first
    /// (`hugepages::HugePages`).
    HugetlbMemfd,
    /// A file on a hugetlbfs of 2 MiB pages that the harness mounts for the guest
    /// (examples/qemu/guest-ram-file.args); reserve the pages first.
    HugetlbfsFile,
    /// A file of base pages the test names (`shm_ram_file`), so that a backend given
    /// `--guest-memory-file` maps the same one (examples/qemu/guest-ram-file.args). Removed
    /// when the VM ends.
    File(PathBuf),
}

impl GuestRam {
    /// Removes a `File`'s guest RAM once its QEMU is gone (nothing for the other kinds).
    fn remove_file(&self) {
        if let GuestRam::File(path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A path on /dev/shm (a tmpfs: the file's pages count as QEMU's RssShmem) for a guest's RAM
/// file, unique to this test process and `name`.
pub fn shm_ram_file(name: &str) -> PathBuf {
    PathBuf::from(format!(
        "/dev/shm/balloon-lab-{name}-{}.ram",
        std::process::id()
    ))
}

/// The guest RAM file's name in its hugetlbfs mount.
const HUGETLBFS_RAM_FILE: &str = "guest-ram";

/// Where the hugetlbfs for a guest's RAM file is mounted: beside its run directory, so that
/// removing the run directory never meets a mount point.
fn hugetlbfs_dir(run_dir: &Path) -> PathBuf {
    let mut dir = run_dir.as_os_str().to_owned();
    dir.push(".hugetlbfs");
    PathBuf::from(dir)
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub name: String,
    pub image: Image,
    pub mem_mib: u64,
    pub ram: GuestRam,
    pub cpus: u32,
    pub builtin_balloon: Option<BuiltinBalloon>,
    pub vhost_user_balloon: Option<VhostUserBalloon>,
    /// Extra virtio-serial ports: (port name, host socket path QEMU connects to as a client).
    pub serial_ports: Vec<(String, PathBuf)>,
    /// A vhost-user vsock device on this socket (vhost-device-vsock), guest CID 3.
    pub vsock: Option<PathBuf>,
    /// Modules the mini image inserts at boot.
    pub modules: Vec<String>,
    pub extra_args: Vec<String>,
    /// Extra guest kernel parameters.
    pub kernel_args: Vec<String>,
    /// A guest reboot restarts the guest (QEMU resets the machine) instead of ending QEMU.
    pub allow_reboot: bool,
}

impl VmConfig {
    pub fn new(name: &str) -> Self {
        VmConfig {
            name: name.to_string(),
            image: Image::Mini,
            mem_mib: 1024,
            ram: GuestRam::Memfd,
            cpus: 1,
            builtin_balloon: None,
            vhost_user_balloon: None,
            serial_ports: Vec::new(),
            vsock: None,
            modules: vec!["virtio_balloon".into()],
            extra_args: Vec::new(),
            kernel_args: Vec::new(),
            allow_reboot: false,
        }
    }

    fn args(&self, run_dir: &Path) -> Result<Vec<String>> {
        let image = self.image.dir();
        let kernel = lab::require(image.join("vmlinuz"), "guest kernel", "mini")?;
        let initrd = lab::require(image.join("initrd.cpio"), "guest initramfs", "mini")?;
        let mem = self.mem_mib;
        let accel = if lab::use_kvm() { "kvm" } else { "tcg" };
        let mut cmdline = String::from("console=ttyS0 panic=-1 loglevel=4");
        if self.image == Image::Mini {
            cmdline.push_str(&format!(" lab.modules={}", self.modules.join(",")));
        }
        for arg in &self.kernel_args {
            cmdline.push(' ');
            cmdline.push_str(arg);
        }
        let p = |name: &str| run_dir.join(name).display().to_string();
        let mut a: Vec<String> = vec![
            "-name".into(),
            self.name.clone(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-smp".into(),
            self.cpus.to_string(),
            "-kernel".into(),
            kernel.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            cmdline,
            "-serial".into(),
            format!("file:{}", p("serial.log")),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", p("qmp.sock")),
            "-device".into(),
            "virtio-serial-pci,id=vser".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                p("agent.sock")
            ),
            "-device".into(),
            format!("virtserialport,bus=vser.0,chardev=agent,name={AGENT_PORT_NAME}"),
        ];
        if !self.allow_reboot {
            // A guest that panics or reboots ends the test's QEMU at once.
            a.push("-no-reboot".into());
        }
        let ram_args = match self.ram {
            GuestRam::Memfd => GUEST_RAM_ARGS,
            GuestRam::HugetlbMemfd => GUEST_RAM_HUGETLB_ARGS,
            GuestRam::HugetlbfsFile | GuestRam::File(_) => GUEST_RAM_FILE_ARGS,
        };
        let mem_path = match &self.ram {
            GuestRam::File(path) => path.clone(),
            _ => hugetlbfs_dir(run_dir).join(HUGETLBFS_RAM_FILE),
        };
        a.extend(example_args(
            ram_args,
            &[
                ("accel", accel.to_string()),
                ("mem_mib", mem.to_string()),
                ("mem_path", mem_path.display().to_string()),
            ],
        ));
        if lab::use_kvm() {
            a.extend(["-cpu".into(), "host".into()]);
        }
        if self.image == Image::Debian {
            let disk = lab::require(image.join("rootfs.ext4"), "Debian guest disk", "debian")?;
            a.extend([
                "-drive".into(),
                // snapshot=on: every VM starts from the pristine image and writes nowhere.
                format!("file={},if=virtio,format=raw,snapshot=on", disk.display()),
            ]);
        }
        for (i, (name, path)) in self.serial_ports.iter().enumerate() {
            a.extend([
                "-chardev".into(),
                format!("socket,id=port{i},path={},reconnect-ms=500", path.display()),
                "-device".into(),
                format!("virtserialport,bus=vser.0,chardev=port{i},name={name}"),
            ]);
        }
        if let Some(b) = &self.builtin_balloon {
            a.extend([
                "-device".into(),
                format!(
                    "virtio-balloon-pci,id=balloon0,free-page-reporting={},deflate-on-oom={}",
                    on_off(b.free_page_reporting),
                    on_off(b.deflate_on_oom)
                ),
            ]);
        }
        if let Some(v) = &self.vhost_user_balloon {
            a.extend(example_args(
                VHOST_BALLOON_ARGS,
                &[("socket", v.socket.display().to_string())],
            ));
        }
        if let Some(sock) = &self.vsock {
            a.extend([
                "-chardev".into(),
                format!("socket,id=vsock,path={}", sock.display()),
                "-device".into(),
                "vhost-user-vsock-pci,chardev=vsock".into(),
            ]);
        }
        a.extend(self.extra_args.iter().cloned());
        Ok(a)
    }
}

/// QEMU arguments from one of the files in examples/qemu/ (one argument per line, `#` comments,
/// `{name}` placeholders): the examples and the tests share one source for these lines.
pub fn example_args(text: &str, vars: &[(&str, String)]) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            vars.iter()
                .fold(l.to_string(), |l, (k, v)| l.replace(&format!("{{{k}}}"), v))
        })
        .collect()
}

const GUEST_RAM_ARGS: &str = include_str!("../../examples/qemu/guest-ram.args");
const GUEST_RAM_HUGETLB_ARGS: &str = include_str!("../../examples/qemu/guest-ram-hugetlb.args");
const GUEST_RAM_FILE_ARGS: &str = include_str!("../../examples/qemu/guest-ram-file.args");
const VHOST_BALLOON_ARGS: &str = include_str!("../../examples/qemu/vhost-balloon.args");

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// A running guest. Dropping it kills QEMU (also when a test panics); if the test process
/// itself dies, the kernel kills QEMU through PR_SET_PDEATHSIG.
pub struct Vm {
    pub config: VmConfig,
    pub run_dir: PathBuf,
    child: Child,
    pub qmp: Qmp,
    pub agent: Agent,
    /// The mount holding guest RAM (GuestRam::HugetlbfsFile).
    hugetlbfs: Option<HugetlbfsMount>,
}

impl Vm {
    /// Starts QEMU and waits until the guest's agent answers.
    pub fn start(config: VmConfig) -> Result<Vm> {
        config.image.ensure()?;
        let qemu = lab::qemu_binary()?;
        let run_dir = lab::run_dir(&config.name)?;
        let hugetlbfs = match config.ram {
            GuestRam::HugetlbfsFile => Some(HugetlbfsMount::mount(&hugetlbfs_dir(&run_dir))?),
            GuestRam::Memfd | GuestRam::HugetlbMemfd | GuestRam::File(_) => None,
        };
        let args = config.args(&run_dir)?;
        std::fs::write(run_dir.join("qemu.cmdline"), args.join(" "))
            .ctx(|| "writing qemu.cmdline".into())?;
        let stderr = std::fs::File::create(run_dir.join("qemu.stderr"))
            .ctx(|| "creating qemu.stderr".into())?;
        let mut cmd = Command::new(&qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        lab::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().ctx(|| format!("starting {}", qemu.display()))?;
        let qmp_path = run_dir.join("qmp.sock");
        let connected = wait_for(
            "QEMU's QMP socket",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || {
                if let Some(status) = child.try_wait().ctx(|| "waiting on QEMU".into())? {
                    return Err(exited(&run_dir, status.to_string()));
                }
                Ok(match Qmp::connect(&qmp_path, Duration::from_secs(60)) {
                    Ok(qmp) => Poll::Ready(qmp),
                    Err(e) => Poll::Pending(e.to_string()),
                })
            },
        );
        let qmp = match connected {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                config.ram.remove_file();
                return Err(e);
            }
        };
        let agent = match Agent::connect(&run_dir.join("agent.sock")) {
            Ok(a) => a,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                config.ram.remove_file();
                return Err(e);
            }
        };
        let mut vm = Vm {
            config,
            run_dir,
            child,
            qmp,
            agent,
            hugetlbfs,
        };
        vm.wait_agent(Duration::from_secs(120))?;
        Ok(vm)
    }

    /// Reboots the guest at once (sysrq b: no driver removal, no deflate), runs `while_down`
    /// once it no longer answers, and waits until the new kernel's agent does. Needs
    /// `VmConfig::allow_reboot`.
    pub fn reboot_abruptly(&mut self, while_down: impl FnOnce()) -> Result<()> {
        self.agent
            .spawn("sleep 0.5; echo b > /proc/sysrq-trigger")?;
        wait_for(
            "the guest to go down",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                Ok(
                    match self.agent.run_timeout("true", Duration::from_millis(500)) {
                        Ok(_) => Poll::Pending("still up".into()),
                        Err(_) => Poll::Ready(()),
                    },
                )
            },
        )?;
        while_down();
        self.wait_agent(Duration::from_secs(120))
    }

    /// Waits until the guest agent answers: the guest has booted.
    pub fn wait_agent(&mut self, timeout: Duration) -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().ctx(|| "waiting on QEMU".into())? {
                return Err(exited(&self.run_dir, status.to_string()));
            }
            match self.agent.run_timeout("true", Duration::from_secs(2)) {
                Ok(out) if out.success() => return Ok(()),
                Ok(_) | Err(LabError::Timeout { .. }) => {}
                // QEMU drops the host end of the agent's port when the guest reboots: connect
                // again (its chardev is a server that accepts a new connection).
                Err(LabError::Agent(_)) => {
                    if let Ok(agent) = Agent::connect(&self.run_dir.join("agent.sock")) {
                        self.agent = agent;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
            if start.elapsed() > timeout {
                return Err(LabError::Timeout {
                    what: format!("the guest agent of {}", self.config.name),
                    secs: start.elapsed().as_secs_f64(),
                    last: format!("; serial log tail:\n{}", serial_tail(&self.run_dir)),
                });
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// QEMU's memory figures from /proc.
    pub fn host_memory(&self) -> Result<ProcMemory> {
        host::proc_memory(self.pid())
    }

    /// Bytes of guest RAM the host really holds (the allocated blocks of its memfd or file).
    pub fn ram_allocated(&self) -> Result<u64> {
        match (&self.hugetlbfs, &self.config.ram) {
            (Some(mount), _) => mount.allocated(HUGETLBFS_RAM_FILE),
            (None, GuestRam::File(path)) => host::file_allocated(path),
            (None, _) => host::memfd_allocated(self.pid()),
        }
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn serial_log(&self) -> String {
        std::fs::read_to_string(self.run_dir.join("serial.log")).unwrap_or_default()
    }

    /// The devices the guest's virtio_balloon driver is bound to (e.g. "virtio2"), empty when
    /// it is bound to none or not loaded at all.
    pub fn balloon_driver_devices(&mut self) -> Result<Vec<String>> {
        let listing = self
            .agent
            .sh("d=/sys/bus/virtio/drivers/virtio_balloon; if [ -d $d ]; then ls $d; fi")?;
        Ok(listing
            .split_whitespace()
            .filter(|entry| entry.starts_with("virtio"))
            .map(str::to_string)
            .collect())
    }

    /// Reads our balloon device's config space (num_pages, actual) from the guest, as its
    /// driver does: 32-bit reads of the device-specific registers of the virtio-pci device
    /// (PCI id 1af4:1045), found through its capabilities. QEMU serves such a read in the
    /// vCPU thread, asking the backend. Needs the guest kernel parameter `iomem=relaxed`
    /// (the driver holds the registers, /dev/mem refuses them otherwise).
    pub fn balloon_config(&mut self, timeout: Duration) -> Result<(u32, u32)> {
        let out = self.agent.run_timeout(BALLOON_CONFIG_READ, timeout)?;
        let words: Vec<u32> = out
            .stdout
            .split_whitespace()
            .filter_map(|w| u32::from_str_radix(w.trim_start_matches("0x"), 16).ok())
            .collect();
        match (out.success(), words.as_slice()) {
            (true, [num_pages, actual]) => Ok((*num_pages, *actual)),
            _ => Err(LabError::Other(format!(
                "reading the balloon config in the guest: {out:?}"
            ))),
        }
    }

    /// Makes the guest write `mib` MiB of tmpfs and free them again, so that the host holds
    /// memory the guest no longer uses.
    pub fn touch_and_free(&mut self, mib: u64) -> Result<()> {
        // A tmpfs of its own: the image's /tmp may be small (Debian's is half of RAM).
        self.agent.sh(&format!(
            "d=$(mktemp -d) && mount -t tmpfs -o size={}M fill $d && \
             dd if=/dev/zero of=$d/fill bs=1M count={mib} 2>/dev/null; r=$?; umount $d; rmdir $d; exit $r",
            mib + 1
        ))?;
        Ok(())
    }
}

/// Busybox shell: the virtio-pci capability of type 4 (device config) names a BAR and an
/// offset; `devmem` reads num_pages and actual there.
const BALLOON_CONFIG_READ: &str = r#"set -e
d=$(grep -l 0x1045 /sys/bus/pci/devices/*/device | head -n 1); d=${d%/device}
at() { od -An -tu$2 -j$1 -N$2 "$d/config" | tr -d ' '; }
p=$(at 52 1); bar=; off=
while [ "$p" -ne 0 ]; do
  if [ "$(at $p 1)" -eq 9 ] && [ "$(at $((p + 3)) 1)" -eq 4 ]; then
    bar=$(at $((p + 4)) 1); off=$(at $((p + 8)) 4)
  fi
  p=$(at $((p + 1)) 1)
done
[ -n "$bar" ]
base=$(sed -n "$((bar + 1))p" "$d/resource" | cut -d' ' -f1)
devmem $((base + off)) 32
devmem $((base + off + 4)) 32"#;

fn serial_tail(run_dir: &Path) -> String {
    let log = std::fs::read_to_string(run_dir.join("serial.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn exited(run_dir: &Path, status: String) -> LabError {
    let stderr = std::fs::read_to_string(run_dir.join("qemu.stderr")).unwrap_or_default();
    LabError::QemuExited {
        status: format!("{status}; stderr: {}", stderr.trim()),
        serial_tail: serial_tail(run_dir),
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // With QEMU gone, the guest RAM file and its mount can go.
        self.hugetlbfs = None;
        self.config.ram.remove_file();
        if std::thread::panicking() {
            eprintln!(
                "VM {} kept its run directory for inspection: {}",
                self.config.name,
                self.run_dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
    }
}
