//! Memory pressure from PSI (/proc/pressure/memory).

/// "some avg10" from the text of /proc/pressure/memory.
pub fn some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

pub fn read() -> Option<f64> {
    some_avg10(&std::fs::read_to_string("/proc/pressure/memory").ok()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_some_avg10() {
        let t = "some avg10=12.50 avg60=1.00 avg300=0.00 total=123\nfull avg10=3.00 avg60=0.00 avg300=0.00 total=5\n";
        assert_eq!(super::some_avg10(t), Some(12.5));
        assert_eq!(super::some_avg10("garbage"), None);
    }
}
