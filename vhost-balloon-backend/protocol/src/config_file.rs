//! Reading a daemon's TOML config file, for the backend, the keeper and the scheduler alike:
//! bounded in size, and every error names the file. And laying a daemon's command line over
//! its config file, for the daemons whose every option can be given in either.

use serde::de::DeserializeOwned;
use serde::Serialize;
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
    #[error("the command line's options: {0}")]
    CommandLine(#[from] toml::ser::Error),
}

/// Reads and parses the TOML file at `path`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigFileError> {
    parse(path, &read_text(path)?)
}

/// The options a daemon runs with: each one its command line gives, and the others from the
/// config file at `file`. `T` declares every option once, for both (clap and serde derives on
/// one struct, every field an `Option`, so an option the command line leaves out serialises to
/// nothing and the file's value stands).
pub fn layered<T: Serialize + DeserializeOwned>(
    command_line: T,
    file: Option<&Path>,
) -> Result<T, ConfigFileError> {
    let Some(path) = file else {
        return Ok(command_line);
    };
    let text = read_text(path)?;
    // The file alone first, so that an unknown key or a wrong type is reported with its line.
    parse::<T>(path, &text)?;
    let mut options: toml::Table = parse(path, &text)?;
    options.extend(toml::Table::try_from(&command_line)?);
    toml::Value::Table(options)
        .try_into()
        .map_err(|source| ConfigFileError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
}

fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigFileError> {
    toml::from_str(text).map_err(|source| ConfigFileError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

fn read_text(path: &Path) -> Result<String, ConfigFileError> {
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
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Example {
        name: String,
    }

    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Options {
        socket: Option<String>,
        interval: Option<u64>,
        discard: Option<bool>,
        #[serde(skip)]
        config: Option<PathBuf>,
    }

    #[test]
    fn the_command_line_wins_and_the_file_fills_in() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("d.toml");
        std::fs::write(&file, "socket = \"/run/a\"\ninterval = 9\n").unwrap();
        let command_line = Options {
            interval: Some(2),
            discard: Some(false),
            config: Some(file.clone()),
            ..Options::default()
        };
        let options = layered(command_line, Some(&file)).unwrap();
        assert_eq!(
            (options.socket.as_deref(), options.interval, options.discard),
            (Some("/run/a"), Some(2), Some(false))
        );
        let alone = Options {
            interval: Some(3),
            ..Options::default()
        };
        assert_eq!(
            layered(alone, None).unwrap().interval,
            Some(3),
            "no file: the command line alone"
        );
        for (bad, what) in [
            ("sockett = \"/x\"\n", "line 1"),
            ("interval = \"9\"\n", "line 1"),
            ("config = \"/etc/other.toml\"\n", "unknown field"),
        ] {
            std::fs::write(&file, bad).unwrap();
            let e = layered(Options::default(), Some(&file)).unwrap_err();
            assert!(matches!(e, ConfigFileError::Parse { .. }), "{bad}: {e}");
            let e = e.to_string();
            assert!(e.contains("d.toml") && e.contains(what), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "name = \"a\"\n").unwrap();
        assert_eq!(
            read::<Example>(&good).unwrap(),
            Example { name: "a".into() }
        );
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "name = 5\n").unwrap();
        let e = read::<Example>(&bad).unwrap_err();
        assert!(matches!(e, ConfigFileError::Parse { .. }));
        assert!(e.to_string().contains("bad.toml"), "{e}");
        let missing = dir.path().join("missing.toml");
        assert!(matches!(
            read::<Example>(&missing),
            Err(ConfigFileError::Read { .. })
        ));
        let huge = dir.path().join("huge.toml");
        std::fs::write(&huge, "#".repeat(MAX_CONFIG_BYTES as usize + 1)).unwrap();
        assert!(matches!(
            read::<Example>(&huge),
            Err(ConfigFileError::TooLarge { .. })
        ));
    }
}
