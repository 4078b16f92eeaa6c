//! How many cases each property runs (shared by every fuzz target of the workspace).

use proptest::test_runner::Config as ProptestConfig;

/// `PROPTEST_CASES` if set (`make fuzz` sets a large number), else `default`, so that
/// `cargo test` stays quick. (proptest's `proptest!` also applies the variable over the config
/// it is given, so this only decides the default.)
pub fn config(default: u32) -> ProptestConfig {
    if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(default)
    }
}
