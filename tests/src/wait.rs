//! Waiting for conditions with deadlines: every wait in the tests goes through here, so none is
//! a bare sleep standing in for a condition.

use crate::{LabError, Result};
use std::time::{Duration, Instant};

/// What one poll saw: the value when the condition holds, or a description of the state.
pub enum Poll<T> {
    Ready(T),
    Pending(String),
}

/// Polls `check` every `interval` until it is ready, an error occurs, or `timeout` passes. The
/// timeout error names `what` and the last state seen.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> Result<Poll<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        let last = match check()? {
            Poll::Ready(v) => return Ok(v),
            Poll::Pending(state) => state,
        };
        if start.elapsed() >= timeout {
            return Err(LabError::Timeout {
                what: what.to_string(),
                secs: start.elapsed().as_secs_f64(),
                last: if last.is_empty() {
                    String::new()
                } else {
                    format!(" (last: {last})")
                },
            });
        }
        std::thread::sleep(interval);
    }
}
