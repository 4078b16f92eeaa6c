//! The adaptive inflation rate of the patent's balloon application: it stays within [min, max],
//! rises after every chunk the guest gave without trouble, and is divided by a constant when an
//! allocation fails or the guest shows memory pressure.
//!
//! Two refinements make the ramp fast without weakening that contract. A new inflation starts
//! from what the guest can give now (its available memory above the reserve, per second) when
//! PSI shows it calm (otherwise from where the rate is). And while PSI stays calm the rate doubles after a
//! chunk instead of adding one step. Any sign of pressure brings back the additive step, and a
//! failure still divides the rate.

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
        // A rate of zero would never claim a page (and the pacing divides by the rate).
        let min = min.max(1);
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

    /// A chunk the guest gave without trouble; `calm`: PSI shows (next to) no pressure.
    pub fn success(&mut self, calm: bool) {
        let grown = if calm {
            (self.rate.saturating_mul(2)).max(self.rate + self.step)
        } else {
            self.rate + self.step
        };
        self.rate = grown.min(self.max);
    }

    /// A new inflation: from `headroom` (bytes the guest can give without going under its
    /// reserve) per second when calm, else from where the rate is.
    pub fn start(&mut self, headroom: u64, calm: bool) {
        if calm {
            self.rate = headroom.clamp(self.min, self.max);
        }
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
                r.success(false)
            } else {
                r.failure()
            }
            seen.push(r.rate());
        }
        assert_eq!(seen, vec![10, 35, 60, 85, 100, 100, 25, 50, 12, 10]);
    }

    #[test]
    fn a_calm_guest_starts_from_its_headroom_and_doubles() {
        let mut r = RateController::new(16, 1000, 32, 4);
        r.start(200, true);
        assert_eq!(r.rate(), 200);
        r.success(true);
        assert_eq!(r.rate(), 400);
        r.success(false);
        assert_eq!(r.rate(), 432, "pressure: back to the additive step");
        r.success(true);
        r.success(true);
        assert_eq!(r.rate(), 1000, "never above the maximum");
        r.failure();
        assert_eq!(r.rate(), 250);
        // Not calm: the rate stays where it is; more headroom than the maximum: the bounds.
        r.start(5000, false);
        assert_eq!(r.rate(), 250);
        r.start(5000, true);
        assert_eq!(r.rate(), 1000);
        r.start(0, true);
        assert_eq!(r.rate(), 16);
        // From the minimum, a calm doubling never grows by less than a step.
        r.success(true);
        assert_eq!(r.rate(), 48);
    }

    #[test]
    fn degenerate_settings_stay_sane() {
        let mut r = RateController::new(50, 10, 5, 0);
        assert_eq!((r.rate(), r.max), (50, 50));
        r.failure();
        assert_eq!(r.rate(), 50);
        let mut r = RateController::new(0, 0, 0, 4);
        r.start(0, true);
        r.failure();
        assert_eq!(r.rate(), 1, "never zero");
    }
}
