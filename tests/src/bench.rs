//! Benchmark results: every benchmark writes `target/bench/NAME.json` and prints one line.

use crate::error::IoContext;
use crate::Result;
use serde::Serialize;

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

impl BenchResult {
    /// Writes the JSON file and prints the one-line summary.
    pub fn publish(&self) -> Result<()> {
        let dir = crate::lab::repo_root().join("target/bench");
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{}.json", self.name));
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        std::fs::write(&path, text + "\n").ctx(|| format!("writing {}", path.display()))?;
        println!(
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
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
