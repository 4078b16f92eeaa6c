//! What every daemon's `main` does first: resolve its options and start logging.

use std::fmt::Display;

/// Logs to stderr at `level` (RUST_LOG overrides it), with millisecond timestamps.
pub fn init_logging(level: &str) {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
}

/// The resolved options, or the reason they are not, said under `program`'s name; then exit
/// status 2, as for a bad command line.
pub fn options_or_exit<T, E: Display>(program: &str, options: Result<T, E>) -> T {
    options.unwrap_or_else(|e| {
        eprintln!("{program}: {e}");
        std::process::exit(2)
    })
}
