//! The lab on an ordinary Debian host: provisioning and QEMU 11 work with Debian's own QEMU
//! installed beside them, and the rootfs comes from the Debian mirror the host's apt names.
//!
//! A host QEMU is simulated, not installed: on these machines installing Debian's
//! qemu-system-x86 would replace packages the host already has. The test downloads the host
//! release's qemu-system-common (its modules in /usr/lib/x86_64-linux-gnu/qemu, the directory
//! the rootfs's QEMU has compiled in) and libepoxy0 (what ui-opengl.so links to) with
//! `apt-get download`, and lays them over /usr/lib/x86_64-linux-gnu with a read-only overlay in a
//! private mount namespace. Nothing on the host changes; the overlay ends with the namespace.
//! Without isolation QEMU 11 then fails exactly as on such a host: "failed to initialize module:
//! /usr/lib/x86_64-linux-gnu/qemu/ui-opengl.so / Only modules from the same build can be loaded".

use balloon_lab::lab::{lab_dir, repo_root};
use balloon_lab::{BuiltinBalloon, Vm, VmConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Set (to the directory laid over /usr/lib/x86_64-linux-gnu) for the inner test.
const INNER_ENV: &str = "BALLOON_LAB_HOST_QEMU_LOWER";
const HOST_LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu";
/// A module the host's QEMU ships and the rootfs's QEMU 11 asks for on `-device help`.
const HOST_MODULE: &str = "/usr/lib/x86_64-linux-gnu/qemu/ui-opengl.so";

/// A scratch directory under the temp dir, removed when dropped (also when the test fails).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(out.status.success(), "{what} failed: {}", text(&out));
    out
}

/// Runs inside the private mount namespace with the host-like module directory in place.
#[test]
#[ignore = "run only as the child of provisions_and_boots_with_a_host_qemu_installed"]
fn inner_with_host_qemu_modules() {
    if std::env::var_os(INNER_ENV).is_none() {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    // Otherwise the test would prove nothing.
    assert!(
        Path::new(HOST_MODULE).exists(),
        "the host QEMU's modules are not visible at {HOST_MODULE}"
    );

    // Provisioning, as `make test` and `make demo` start it (on a provisioned lab only the
    // wrapper is written and checked).
    let out = run(
        Command::new(repo_root().join("scripts/lab.sh")).arg("qemu"),
        "scripts/lab.sh qemu with a host QEMU installed",
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim_end());

    let qemu = lab_dir().join("bin/qemu-system-x86_64");
    let out = run(
        Command::new(&qemu).args(["-device", "help"]),
        "the QEMU 11 wrapper's -device help",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("vhost-user-test-device-pci"),
        "-device help lacks vhost-user-test-device-pci: {}",
        text(&out)
    );
    assert!(
        stdout.contains("name \"usb-host\""),
        "-device help lacks usb-host (from the rootfs's own hw-usb-host.so): {}",
        text(&out)
    );
    assert!(
        !stderr.contains("module"),
        "QEMU 11 still tried a foreign module: {stderr}"
    );

    // And a guest boots under it, with the stock driver bound to a balloon.
    let mut config = VmConfig::new("hostqemu");
    config.mem_mib = 512;
    config.builtin_balloon = Some(BuiltinBalloon::default());
    let mut vm = Vm::start(config).expect("boot the mini guest with a host QEMU installed");
    let bound = vm.balloon_driver_devices().unwrap();
    assert!(!bound.is_empty(), "virtio_balloon did not bind: {bound:?}");
}

/// Downloads the host release's QEMU modules (and the library they need) and unpacks them into
/// `dir`; returns the unpacked usr/lib/x86_64-linux-gnu.
fn host_qemu_modules(dir: &Path) -> PathBuf {
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    let download = || {
        Command::new("apt-get")
            .args(["download", "-q", "qemu-system-common", "libepoxy0"])
            .current_dir(&debs)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // A fresh machine may have no package lists yet.
    if !download() {
        run(
            Command::new("apt-get").args(["update", "-qq"]),
            "apt-get update",
        );
        run(
            Command::new("apt-get")
                .args(["download", "-q", "qemu-system-common", "libepoxy0"])
                .current_dir(&debs),
            "apt-get download qemu-system-common libepoxy0 (from the host's apt mirror)",
        );
    }
    let root = dir.join("root");
    for deb in std::fs::read_dir(&debs).unwrap() {
        let deb = deb.unwrap().path();
        run(
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
            "dpkg-deb -x",
        );
    }
    let lower = root.join("usr/lib/x86_64-linux-gnu");
    assert!(
        lower.join("qemu/ui-opengl.so").exists(),
        "qemu-system-common has no {HOST_MODULE}"
    );
    lower
}

#[test]
fn provisions_and_boots_with_a_host_qemu_installed() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (as CI runs it): it mounts a host QEMU's module directory \
         in a private mount namespace (unshare --mount)"
    );
    let scratch = Scratch::new("balloon-lab-host-qemu");
    let lower = host_qemu_modules(&scratch.0);

    // unshare execs sh in the same process; sh mounts the overlay (only in this namespace, as
    // propagation is private) and execs the inner test.
    let exe = std::env::current_exe().expect("own test binary");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "mount -t overlay lab-host-qemu -o \"ro,lowerdir=${INNER_ENV}:{HOST_LIB_DIR}\" \
             {HOST_LIB_DIR} && exec \"$@\""
        ))
        .arg("sh")
        .arg(&exe)
        .args([
            "--exact",
            "inner_with_host_qemu_modules",
            "--ignored",
            "--nocapture",
        ])
        .env(INNER_ENV, &lower)
        .output()
        .expect("run unshare (util-linux)");
    let report = text(&out);
    assert!(
        out.status.success(),
        "with a host QEMU's modules in {HOST_LIB_DIR}/qemu: {report}"
    );
    assert!(
        report.contains("1 passed"),
        "the inner test did not run: {report}"
    );
}

/// Runs lab.sh's debian_mirror against apt sources in `dir` (APT_CONFIG points apt, and so
/// lab.sh, at them). Returns (success, stdout, stderr).
fn debian_mirror(dir: &Path) -> (bool, String, String) {
    let conf = dir.join("apt.conf");
    std::fs::write(
        &conf,
        format!(
            "Dir::Etc::sourcelist \"{}/sources.list\";\nDir::Etc::sourceparts \"{}/sources.list.d\";\n",
            dir.display(),
            dir.display()
        ),
    )
    .unwrap();
    // The argument makes a lab.sh that does not know it is sourced stop at once ("unknown
    // step") instead of provisioning.
    let out = Command::new("bash")
        .args([
            "-c",
            "source \"$1\" lab-sh-sourced-by-a-test && debian_mirror",
            "bash",
        ])
        .arg(repo_root().join("scripts/lab.sh"))
        .env("APT_CONFIG", &conf)
        .output()
        .expect("run bash");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn host_codename() -> String {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |k: &str| {
        os.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim_matches('"').to_string())
    };
    match (field("ID="), field("VERSION_CODENAME=")) {
        (Some(id), Some(c)) if id == "debian" && !c.is_empty() => c,
        _ => "stable".into(),
    }
}

#[test]
fn mirror_comes_only_from_the_hosts_apt_sources() {
    let scratch = Scratch::new("balloon-lab-mirror");
    let base = &scratch.0;
    let c = host_codename();
    let case = |name: &str, list: Option<&str>, parts: &[(&str, String)]| {
        let dir = base.join(name);
        std::fs::create_dir_all(dir.join("sources.list.d")).unwrap();
        if let Some(list) = list {
            std::fs::write(dir.join("sources.list"), list).unwrap();
        }
        for (file, body) in parts {
            std::fs::write(dir.join("sources.list.d").join(file), body).unwrap();
        }
        let result = debian_mirror(&dir);
        eprintln!("{name}: {result:?}");
        result
    };

    // A stock Debian 12 host: deb822, the archive and its security mirror; other vendors'
    // files beside it, and a disabled file apt does not read.
    let stock = format!(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: {c} {c}-updates\nComponents: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
         Types: deb\nURIs: http://mirror.example/debian-security\nSuites: {c}-security\n\
         Components: main\n"
    );
    let vendor = "Types: deb\nURIs: https://vendor.example/node_20.x\nSuites: nodistro\n\
                  Components: main\n"
        .to_string();
    let (ok, out, err) = case(
        "deb822",
        None,
        &[
            ("debian.sources", stock.clone()),
            ("a-vendor.sources", vendor.clone()),
            (
                "b-vendor.list",
                "deb https://other.example/apt cloud-sdk main\n".into(),
            ),
            (
                "c.list.disabled",
                format!("deb http://disabled.example/debian {c} main\n"),
            ),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "http://mirror.example/debian");
    assert!(
        !err.contains("mirror.example"),
        "the mirror's host must not be logged: {err}"
    );

    // Classic one-line sources.list: comments, deb-src, [options] and security skipped.
    let (ok, out, err) = case(
        "classic",
        Some(&format!(
            "# deb http://commented.example/debian {c} main\n\
             deb http://security.example/debian-security {c}-security main\n\
             deb-src http://src.example/debian {c} main\n\
             deb [ arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg ] \
             http://proxy.example:3142/debian {c} main\n"
        )),
        &[("debian.sources", stock.clone())],
    );
    assert!(ok, "{err}");
    assert_eq!(
        out, "http://proxy.example:3142/debian",
        "sources.list comes first"
    );

    // deb822 details: Enabled: no, deb-src only, lower-case field names, folded values.
    let (ok, out, err) = case(
        "deb822-details",
        None,
        &[(
            "debian.sources",
            format!(
                "# a comment\nTypes: deb\nEnabled: no\nURIs: http://disabled.example/debian\n\
                 Suites: {c}\n\ntypes: deb-src\nuris: http://src.example/debian\nsuites: {c}\n\n\
                 types: deb deb-src\nuris:\n http://folded.example/debian\nsuites: stable-updates\n\
                 signed-by:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n"
            ),
        )],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "http://folded.example/debian");

    // No Debian mirror (only security and other vendors), and no sources at all: a clear
    // failure, never a mirror of the script's own choosing.
    for (name, parts) in [
        (
            "none",
            vec![
                ("vendor.sources", vendor.clone()),
                (
                    "security.list",
                    format!("deb http://security.example/debian-security {c}-security main\n"),
                ),
            ],
        ),
        ("empty", vec![]),
    ] {
        let (ok, out, err) = case(name, None, &parts);
        assert!(!ok, "{name}: expected a failure, got mirror {out:?}");
        assert!(out.is_empty(), "{name}: printed a mirror: {out:?}");
        assert!(
            err.contains("Debian mirror") && err.contains("ERROR"),
            "{name}: the failure should say that no Debian mirror is configured: {err}"
        );
    }

    // And the script names no mirror of its own.
    let script = std::fs::read_to_string(repo_root().join("scripts/lab.sh")).unwrap();
    assert!(
        !script.contains("debian.org"),
        "scripts/lab.sh names a Debian mirror host"
    );
}
