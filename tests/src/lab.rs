//! Where the lab keeps QEMU, kernels, images and run directories.

use crate::{LabError, Result};
use std::path::{Path, PathBuf};

/// The repository's root (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The cache directory `scripts/lab.sh` fills (`.lab/`, or `$BALLOON_LAB_DIR`).
pub fn lab_dir() -> PathBuf {
    std::env::var_os("BALLOON_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".lab"))
}

pub(crate) fn require(path: PathBuf, what: &'static str, step: &'static str) -> Result<PathBuf> {
    if path.exists() {
        Ok(path)
    } else {
        Err(LabError::NotProvisioned { what, path, step })
    }
}

/// The QEMU 11 wrapper (runs the trixie rootfs's QEMU through its own loader).
pub fn qemu_binary() -> Result<PathBuf> {
    require(
        lab_dir().join("bin/qemu-system-x86_64"),
        "QEMU 11 wrapper",
        "qemu",
    )
}

/// A host binary of this workspace, built by cargo in the same profile as the caller.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let profile_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            // target/<profile>/deps/test-xxxx or target/<profile>/bin-name
            let dir = exe.parent()?;
            if dir.ends_with("deps") {
                dir.parent().map(Path::to_path_buf)
            } else {
                Some(dir.to_path_buf())
            }
        })
        .unwrap_or_else(|| repo_root().join("target/debug"));
    let path = profile_dir.join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(LabError::Other(format!(
            "{name} is not built at {} (run `cargo build --workspace` in the same profile)",
            path.display()
        )))
    }
}

/// Whether KVM was asked for (`BALLOON_ACCEL=kvm`). TCG is the default: /dev/kvm on the lab
/// machines is PVM, which cannot run stock guest kernels.
pub fn use_kvm() -> bool {
    std::env::var("BALLOON_ACCEL").is_ok_and(|v| v == "kvm")
}

/// A fresh directory for one VM's sockets and logs. Kept short: Unix socket paths are limited
/// to 107 bytes.
pub fn run_dir(name: &str) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "balloon-lab/{}-{}-{}",
        name,
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|source| LabError::Io {
        context: format!("creating {}", dir.display()),
        source,
    })?;
    Ok(dir)
}

/// Makes a child started by the harness die with the process that started it (SIGKILL through
/// PR_SET_PDEATHSIG), so no QEMU or daemon outlives a killed test run.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
