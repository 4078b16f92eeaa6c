//! Benchmark results: every benchmark writes `target/bench/NAME.json` and prints one line, in
//! the workspace's one shape (`balloon_protocol::bench`, which the scheduler's benches use too).

pub use balloon_protocol::bench::{median, results_dir, BenchResult};
