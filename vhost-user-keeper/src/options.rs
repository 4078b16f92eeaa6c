//! Command line and TOML config; the command line wins.

use balloon_protocol::config_file::{self, ConfigFileError};
use clap::Parser;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The options, declared once for the command line and the config file (keys as the long
/// options, with underscores).
#[derive(Debug, Default, Parser, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[command(
    name = "vhost-user-keeper",
    version,
    about = "Keeps a vhost-user frontend's connection open across backend restarts: the frontend connects to --socket, the backend to --backend-socket (as a client)"
)]
pub struct Cli {
    /// The socket the frontend connects to (QEMU: -chardev socket,path=...).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The socket the backend connects to (vhost-balloon-backend --client --socket ...).
    #[arg(long)]
    pub backend_socket: Option<PathBuf>,
    /// TOML file with any of these options (keys as the long options, with underscores).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long)]
    pub log_level: Option<String>,
}

#[derive(Debug)]
pub struct Options {
    pub socket: PathBuf,
    pub backend_socket: PathBuf,
    pub log_level: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("config {0}")]
    File(#[from] ConfigFileError),
    #[error("--{0} is required (on the command line or in --config)")]
    Missing(&'static str),
}

impl Cli {
    pub fn resolve(self) -> Result<Options, OptionsError> {
        let config = self.config.clone();
        let o = config_file::layered(self, config.as_deref())?;
        Ok(Options {
            socket: o.socket.ok_or(OptionsError::Missing("socket"))?,
            backend_socket: o
                .backend_socket
                .ok_or(OptionsError::Missing("backend-socket"))?,
            log_level: o.log_level.unwrap_or_else(|| "info".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_wins_over_the_file_and_both_sockets_are_needed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keeper.toml");
        std::fs::write(
            &file,
            "socket = \"/run/a.sock\"\nbackend_socket = \"/run/b.sock\"\n",
        )
        .unwrap();
        let o = Cli::parse_from(["k", "--config", file.to_str().unwrap(), "--socket", "/x"])
            .resolve()
            .unwrap();
        assert_eq!(
            (o.socket.to_str(), o.backend_socket.to_str()),
            (Some("/x"), Some("/run/b.sock"))
        );
        assert!(matches!(
            Cli::parse_from(["k", "--socket", "/x"]).resolve(),
            Err(OptionsError::Missing("backend-socket"))
        ));
        std::fs::write(&file, "sockets = 1\n").unwrap();
        assert!(matches!(
            Cli::parse_from(["k", "--config", file.to_str().unwrap()]).resolve(),
            Err(OptionsError::File(ConfigFileError::Parse { .. }))
        ));
    }
}
