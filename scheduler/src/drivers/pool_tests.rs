use super::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A driver that answers at once, or, while its gate is closed, blocks until it opens; it
/// fails (as a driver timing out would) while `fail` is set.
#[derive(Clone, Default)]
struct Gated {
    closed: Arc<(Mutex<bool>, std::sync::Condvar)>,
    fail: Arc<std::sync::atomic::AtomicBool>,
    calls: Arc<Mutex<Vec<String>>>,
}

impl Gated {
    fn close(&self) {
        *self.closed.0.lock().unwrap() = true;
    }
    fn open(&self) {
        *self.closed.0.lock().unwrap() = false;
        self.closed.1.notify_all();
    }
    fn fail(&self, fail: bool) {
        self.fail.store(fail, std::sync::atomic::Ordering::SeqCst);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn pass(&self, call: String) -> Result<(), DriverError> {
        self.calls.lock().unwrap().push(call);
        let (m, c) = &*self.closed;
        let mut closed = m.lock().unwrap();
        while *closed {
            closed = c.wait(closed).unwrap();
        }
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(DriverError::Io {
                what: "reading".into(),
                source: std::io::ErrorKind::TimedOut.into(),
            });
        }
        Ok(())
    }
}

impl BalloonDriver for Gated {
    fn read(&mut self) -> Result<DriverReading, DriverError> {
        self.pass("read".into())?;
        Ok(DriverReading {
            target_bytes: Some(0),
            actual_bytes: 4096,
            stats: None,
            split: None,
            size_disputed: false,
        })
    }
    fn set_balloon(&mut self, b: u64) -> Result<(), DriverError> {
        self.pass(format!("set {b}"))
    }
    fn describe(&self) -> String {
        "gated".into()
    }
}

struct Panicky;

impl BalloonDriver for Panicky {
    fn read(&mut self) -> Result<DriverReading, DriverError> {
        panic!("a driver bug")
    }
    fn set_balloon(&mut self, _: u64) -> Result<(), DriverError> {
        Err(DriverError::Refused("no".into()))
    }
    fn describe(&self) -> String {
        "panicky".into()
    }
}

fn pool(drivers: &[Gated]) -> DriverPool {
    DriverPool::new(
        drivers
            .iter()
            .enumerate()
            .map(|(i, d)| {
                (
                    format!("g{i}"),
                    Box::new(d.clone()) as Box<dyn BalloonDriver>,
                )
            })
            .collect(),
    )
    .unwrap()
}

fn soon(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

/// Waits (with a deadline) until guest `i`'s worker is free, taking what it answers.
fn until_free(p: &mut DriverPool, i: usize) -> Round {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Round::default();
    while p.is_busy(i) {
        assert!(Instant::now() < deadline, "the worker never finished");
        if let Ok(done) = p.done.recv_timeout(Duration::from_millis(50)) {
            p.finish(done, 0, &mut out);
        }
    }
    out
}

#[test]
fn a_stuck_driver_is_not_asked_again_and_costs_one_deadline_only() {
    let d = [Gated::default(), Gated::default()];
    let mut p = pool(&d);
    d[1].close();
    let t = Instant::now();
    let r = p.read(soon(300));
    let first = t.elapsed();
    assert!(r.readings[0].is_some() && r.readings[1].is_none());
    assert_eq!(r.errors, vec![1], "the missed deadline is an error");
    assert!(first >= Duration::from_millis(300), "{first:?}");
    assert!(!p.is_awaited(1) && p.is_busy(1));
    // Still stuck: not asked again (no second call, no second thread), and not waited for.
    for _ in 0..3 {
        let t = Instant::now();
        let r = p.read(soon(5_000));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(r.readings[0].is_some() && r.readings[1].is_none());
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }
    assert_eq!(d[1].calls(), vec!["read"]);
    assert_eq!(d[0].calls().len(), 4);
    // It answers late: not used, but the ticks wait for it again.
    d[1].open();
    let late = until_free(&mut p, 1);
    assert!(late.errors.is_empty());
    assert!(p.is_awaited(1));
    let r = p.read(soon(5_000));
    assert!(r.readings.iter().all(Option::is_some));
    assert_eq!(p.last_actual(1), Some(4096));
}

#[test]
fn a_guest_that_missed_a_deadline_is_asked_but_not_waited_for() {
    let d = [Gated::default(), Gated::default()];
    let mut p = pool(&d);
    d[1].close();
    d[1].fail(true);
    p.read(soon(100));
    assert!(!p.is_awaited(1));
    // Its driver gives up (its own timeout): an error, late, and still not waited for.
    d[1].open();
    let late = until_free(&mut p, 1);
    assert_eq!(late.errors, vec![1]);
    assert!(!p.is_awaited(1));
    // Asked again now that it is free, and it hangs again: the tick does not wait.
    d[1].close();
    let t = Instant::now();
    let r = p.read(soon(5_000));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(r.readings[0].is_some() && r.readings[1].is_none());
    assert!(
        r.errors.is_empty(),
        "no second missed deadline: {:?}",
        r.errors
    );
    // (The worker may not have started on it yet when the round ends.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while d[1].calls().len() < 2 {
        assert!(Instant::now() < deadline, "never asked again");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(d[1].calls(), vec!["read", "read"]);
    // It recovers: one good answer, even late, and the ticks wait for it again.
    d[1].fail(false);
    d[1].open();
    until_free(&mut p, 1);
    assert!(p.is_awaited(1));
    let r = p.read(soon(5_000));
    assert!(r.readings[1].is_some());
}

#[test]
fn writes_share_the_deadline_and_late_acceptances_are_reported() {
    let d = [Gated::default(), Gated::default()];
    let mut p = pool(&d);
    p.read(soon(5_000));
    d[1].close();
    let t = Instant::now();
    let w = p.write(&[Some(8192), Some(12288)], soon(300));
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(w.accepted, vec![(0, 8192)]);
    assert_eq!(w.errors, vec![1]);
    d[1].open();
    // The next round reports the late acceptance first; the driver is free again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = p.read(soon(5_000));
        if r.accepted.contains(&(1, 12288)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the late write was never reported"
        );
    }
    assert_eq!(d[1].calls()[..2], ["read".to_string(), "set 12288".into()]);
}

#[test]
fn a_panicking_driver_is_an_error_not_a_dead_guest() {
    let mut p = DriverPool::new(vec![(
        "p".into(),
        Box::new(Panicky) as Box<dyn BalloonDriver>,
    )])
    .unwrap();
    for _ in 0..2 {
        let r = p.read(soon(5_000));
        assert!(r.readings[0].is_none());
        assert_eq!(r.errors, vec![0]);
        assert!(p.is_awaited(0));
    }
}
