//! What survives a backend restart: the target (so a restarted backend resumes it and the
//! guest never sees it jump), the stats interval and whether discarding is on. Written
//! atomically: a temporary file, fsync, rename over the old one, fsync of the directory.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("writing state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistentState {
    pub version: u32,
    pub target_pages: u64,
    pub stats_interval_seconds: u64,
    pub discard_enabled: bool,
    /// The guest app's target (absent in files from before the app existed).
    #[serde(default)]
    pub app_target_bytes: u64,
}

impl PersistentState {
    /// Loads the state, or `None` if the file does not exist yet.
    pub fn load(path: &Path) -> Result<Option<Self>, StateError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| StateError::Parse {
                path: path.into(),
                source,
            })
    }

    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let err = |source| StateError::Write {
            path: path.into(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string_pretty(self)
            .map_err(std::io::Error::from)
            .map_err(err)?;
        {
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(text.as_bytes()).map_err(err)?;
            f.write_all(b"\n").map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, path).map_err(err)?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_corrupt() {
        let dir = std::env::temp_dir().join(format!("state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.state");
        let _ = std::fs::remove_file(&path);
        assert_eq!(PersistentState::load(&path).unwrap(), None);
        let s = PersistentState {
            version: 1,
            target_pages: 65536,
            stats_interval_seconds: 5,
            discard_enabled: true,
            app_target_bytes: 1 << 28,
        };
        s.save(&path).unwrap();
        assert_eq!(PersistentState::load(&path).unwrap(), Some(s));
        std::fs::write(&path, "{ garbage").unwrap();
        assert!(matches!(
            PersistentState::load(&path),
            Err(StateError::Parse { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
