//! The adaptive inflation rate of the patent's balloon application: it starts at the minimum,
//! rises by a fixed step after every chunk the guest gave without trouble, and is divided by a
//! constant when an allocation fails or the guest shows memory pressure.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateController {
    pub min: u64,
    pub max: u64,
    pub step: u64,
    pub divisor: u64,
    rate: u64,
}

impl RateController {
    pub fn new(min: u64, max: u64, step: u64, divisor: u64) -> Self {
        let max = max.max(min);
        RateController {
            min,
            max,
            step,
            divisor: divisor.max(2),
            rate: min,
        }
    }

    /// Bytes per second now.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn success(&mut self) {
        self.rate = (self.rate + self.step).min(self.max);
    }

    pub fn failure(&mut self) {
        self.rate = (self.rate / self.divisor).max(self.min);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_of_steps() {
        let mut r = RateController::new(10, 100, 25, 4);
        let mut seen = vec![r.rate()];
        for ok in [true, true, true, true, true, false, true, false, false] {
            if ok {
                r.success()
            } else {
                r.failure()
            }
            seen.push(r.rate());
        }
        assert_eq!(seen, vec![10, 35, 60, 85, 100, 100, 25, 50, 12, 10]);
    }

    #[test]
    fn degenerate_settings_stay_sane() {
        let mut r = RateController::new(50, 10, 5, 0);
        assert_eq!((r.rate(), r.max), (50, 50));
        r.failure();
        assert_eq!(r.rate(), 50);
    }
}
