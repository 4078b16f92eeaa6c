//! Reading a daemon's TOML config file, for the backend, the keeper and the scheduler alike:
//! bounded in size, and every error names the file.

use serde::de::DeserializeOwned;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A config file larger than this is refused (the largest example is a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
}

/// Reads and parses the TOML file at `path`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigFileError> {
    let read_error = |source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(read_error)?
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigFileError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    toml::from_str(&text).map_err(|source| ConfigFileError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Example {
        name: String,
    }

    #[test]
    fn errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("config-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "name = \"a\"\n").unwrap();
        assert_eq!(
            read::<Example>(&good).unwrap(),
            Example { name: "a".into() }
        );
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "name = 5\n").unwrap();
        let e = read::<Example>(&bad).unwrap_err();
        assert!(matches!(e, ConfigFileError::Parse { .. }));
        assert!(e.to_string().contains("bad.toml"), "{e}");
        let missing = dir.join("missing.toml");
        assert!(matches!(
            read::<Example>(&missing),
            Err(ConfigFileError::Read { .. })
        ));
        let huge = dir.join("huge.toml");
        std::fs::write(&huge, "#".repeat(MAX_CONFIG_BYTES as usize + 1)).unwrap();
        assert!(matches!(
            read::<Example>(&huge),
            Err(ConfigFileError::TooLarge { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
