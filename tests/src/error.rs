use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("lab not provisioned: {what} missing at {path} (run `make test` or `scripts/lab.sh {step}`)")]
    NotProvisioned {
        what: &'static str,
        path: PathBuf,
        step: &'static str,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("guest agent: {0}")]
    Agent(String),
    #[error("guest command `{cmd}` failed ({status}): {stderr}")]
    GuestCommand {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("timed out after {secs:.1} s waiting for {what}{last}")]
    Timeout {
        what: String,
        secs: f64,
        last: String,
    },
    #[error("QEMU exited ({status}); serial log tail:\n{serial_tail}")]
    QemuExited { status: String, serial_tail: String },
    #[error("{0}")]
    Other(String),
}

/// Attaches a context string to I/O errors.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> crate::Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> crate::Result<T> {
        self.map_err(|source| LabError::Io {
            context: context(),
            source,
        })
    }
}
