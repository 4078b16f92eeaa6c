//! Benchmark results, one shape for every benchmark in the workspace (`balloon-bench`'s, and the
//! scheduler's `cargo bench` targets): each writes `target/bench/NAME.json` and prints one line.

use serde::Serialize;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub name: String,
    pub metric: String,
    pub unit: String,
    /// Median of `runs` measurements.
    pub value: f64,
    /// Median of the comparison measured side by side in the same invocation.
    pub baseline: f64,
    pub baseline_name: String,
    /// value / baseline.
    pub ratio: f64,
    pub runs: usize,
    /// The goal, in words (e.g. "ratio <= 0.55"), or "record" when there is none yet.
    pub goal: String,
    /// Whether the goal held; `None` when there is no goal.
    pub goal_met: Option<bool>,
    /// Every measurement, for whoever wants more than the medians.
    pub samples: serde_json::Value,
}

/// The median of the finite values (NaN when there is none).
/// The `main` of a `harness = false` benchmark named `name`: runs `bench` when cargo
/// benchmarks (it passes `--bench`; `cargo test --benches` only checks that the program runs),
/// and exits 1 if it fails.
pub fn run_benchmark<E: std::fmt::Display>(name: &str, bench: impl FnOnce() -> Result<(), E>) {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("{name}: not run (a benchmark: `cargo bench`)");
        return;
    }
    if let Err(e) = bench() {
        eprintln!("{name}: FAILED: {e}");
        std::process::exit(1);
    }
}

pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The workspace's root: the nearest directory above this crate that holds `Cargo.lock`.
fn workspace_root() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    crate_dir
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").is_file())
        .unwrap_or(crate_dir)
        .to_path_buf()
}

/// Where results go, whatever the current directory (cargo runs a crate's benches in that
/// crate's directory): `$CARGO_TARGET_DIR/bench` when it is set (a relative one taken from the
/// workspace root), else the workspace's `target/bench`.
pub fn results_dir() -> PathBuf {
    let root = workspace_root();
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    };
    target.join("bench")
}

impl BenchResult {
    /// Writes `NAME.json` in [`results_dir`] and prints the one-line summary.
    pub fn publish(&self) -> io::Result<()> {
        let dir = results_dir();
        let path = dir.join(format!("{}.json", self.name));
        let text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&path, text + "\n"))
            .map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))?;
        println!("{}", self.summary(&path));
        Ok(())
    }

    /// The one-line summary, naming the file the result went to.
    pub fn summary(&self, path: &Path) -> String {
        format!(
            "{}: {} = {:.3} {} vs {} {:.3} {} (ratio {:.3}, {} runs, goal: {}{}) -> {}",
            self.name,
            self.metric,
            self.value,
            self.unit,
            self.baseline_name,
            self.baseline,
            self.unit,
            self.ratio,
            self.runs,
            self.goal,
            match self.goal_met {
                Some(true) => ", met",
                Some(false) => ", NOT met",
                None => "",
            },
            path.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 1.0]), 1.0);
    }

    #[test]
    fn results_go_to_the_workspace_target() {
        // (Unless CARGO_TARGET_DIR says otherwise.)
        if std::env::var_os("CARGO_TARGET_DIR").is_none() {
            let dir = results_dir();
            assert!(dir.ends_with("target/bench"), "{}", dir.display());
            assert_eq!(dir, workspace_root().join("target/bench"));
            assert!(workspace_root().join("Cargo.lock").is_file());
        }
    }

    #[test]
    fn the_summary_names_value_baseline_goal_and_file() {
        let r = BenchResult {
            name: "x".into(),
            metric: "m".into(),
            unit: "ms".into(),
            value: 1.0,
            baseline: 2.0,
            baseline_name: "b".into(),
            ratio: 0.5,
            runs: 3,
            goal: "< 10 ms".into(),
            goal_met: Some(true),
            samples: serde_json::json!({}),
        };
        assert_eq!(
            r.summary(Path::new("/t/x.json")),
            "x: m = 1.000 ms vs b 2.000 ms (ratio 0.500, 3 runs, goal: < 10 ms, met) -> /t/x.json"
        );
    }
}
