//! Fuzzing what the backend does with the guest app's page ranges (untrusted): the checks of
//! `balloon::app_ranges`, and `Balloon::app_inflated` / `app_deflate` on a small guest RAM
//! (two regions of a memfd with a hole between them, mapped as vhost-user maps it).
//!
//! Cases per property: `PROPTEST_CASES` when set (`make fuzz` sets a large number), else the
//! small default below, so that `cargo test` stays quick.

#[path = "../protocol/tests/support/cases.rs"]
mod cases;

use balloon_protocol::app::{PageRange, MAX_RANGES_PER_MESSAGE};
use balloon_protocol::{bytes_to_pages, pages_to_bytes, PAGE_SIZE};
use cases::config;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use vhost_balloon_backend::balloon::{app_ranges, AppRangeError, Balloon};
use vhost_balloon_backend::device::features::FeatureChoice;
use vhost_balloon_backend::memory::ranges::MAX_PFN;
use vhost_balloon_backend::memory::worker::DiscardWorker;
use vhost_balloon_backend::memory::{merge_pfns, DiscardMode, PfnRange};
use vhost_balloon_backend::testing::MemfdRam;
use vhost_balloon_backend::vhu_balloon::regions_of;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The first range `app_ranges` must refuse, if any.
fn first_bad(ranges: &[PageRange]) -> Option<PageRange> {
    ranges
        .iter()
        .copied()
        .find(|r| r.count == 0 || r.start.checked_add(r.count).is_none_or(|e| e > MAX_PFN))
}

/// The union of `[start, end)` spans as its maximal runs, by a sweep over +1/-1 events (not
/// the sort-and-join of `merge_ranges`): touching spans make one run.
fn union_runs(spans: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut events: BTreeMap<u64, i64> = BTreeMap::new();
    for &(s, e) in spans {
        *events.entry(s).or_default() += 1;
        *events.entry(e).or_default() -= 1;
    }
    let mut runs = Vec::new();
    let mut depth = 0i64;
    let mut open = 0;
    for (at, delta) in events {
        let was = depth;
        depth += delta;
        if was == 0 && depth > 0 {
            open = at;
        } else if was > 0 && depth == 0 {
            runs.push((open, at));
        }
    }
    runs
}

fn spans(ranges: &[PageRange]) -> Vec<(u64, u64)> {
    ranges
        .iter()
        .map(|r| (r.start, r.start + r.count))
        .collect()
}

/// Pages in the union of (checked) ranges.
fn union_len(ranges: &[PageRange]) -> u64 {
    union_runs(&spans(ranges)).iter().map(|(s, e)| e - s).sum()
}

fn union_contains(ranges: &[PageRange], page: u64) -> bool {
    ranges
        .iter()
        .any(|r| r.start <= page && page - r.start < r.count)
}

fn start() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0u64..2048,
        1 => (MAX_PFN - 64)..=(MAX_PFN + 64),
        1 => (u64::MAX - 64)..=u64::MAX,
        1 => any::<u64>(),
    ]
}

fn count() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 1u64..64,
        1 => Just(0u64),
        1 => (MAX_PFN - 64)..=(MAX_PFN + 64),
        1 => any::<u64>(),
    ]
}

/// Mostly valid ranges (so that lists of many are accepted now and then), with every kind of
/// bad one.
fn page_range() -> impl Strategy<Value = PageRange> {
    prop_oneof![
        12 => (0u64..2048, 1u64..64).prop_map(|(start, count)| PageRange { start, count }),
        1 => (start(), count()).prop_map(|(start, count)| PageRange { start, count }),
        // Valid, ending at the very last page.
        1 => (1u64..1 << 20).prop_map(|count| PageRange { start: MAX_PFN - count, count }),
    ]
}

/// Checks `app_ranges(input)` against what it must be.
fn check_app_ranges(input: &[PageRange]) -> Result<(), TestCaseError> {
    let got = app_ranges(input);
    if input.len() > MAX_RANGES_PER_MESSAGE {
        prop_assert_eq!(got, Err(AppRangeError::TooManyRanges(input.len())));
        return Ok(());
    }
    if let Some(bad) = first_bad(input) {
        prop_assert_eq!(
            got,
            Err(AppRangeError::BadRange {
                start: bad.start,
                count: bad.count
            })
        );
        return Ok(());
    }
    let out = got.map_err(|e| TestCaseError::fail(format!("valid ranges refused: {e}")))?;
    for r in &out {
        prop_assert!(r.count > 0, "empty range {:?}", r);
        prop_assert!(r.start.checked_add(r.count).is_some_and(|e| e <= MAX_PFN));
    }
    for w in out.windows(2) {
        // Sorted, disjoint and not touching (touching ones are one range).
        prop_assert!(w[0].end() < w[1].start, "{:?} then {:?}", w[0], w[1]);
    }
    // Exactly the union of the input.
    let out_spans: Vec<(u64, u64)> = out.iter().map(|r| (r.start, r.end())).collect();
    prop_assert_eq!(out_spans, union_runs(&spans(input)));
    prop_assert!(out.len() <= input.len());
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn app_ranges_are_checked_and_merged(input in vec(page_range(), 0..40)) {
        check_app_ranges(&input)?;
    }

    #[test]
    fn arbitrary_app_ranges_never_panic(input in vec((any::<u64>(), any::<u64>()), 0..16)) {
        let input: Vec<PageRange> =
            input.into_iter().map(|(start, count)| PageRange { start, count }).collect();
        check_app_ranges(&input)?;
    }
}

/// Around `MAX_RANGES_PER_MESSAGE`: one more is refused whatever the ranges, the limit itself
/// is checked like any other list. (16384-element lists: `PROPTEST_CASES / 2000` cases.)
#[test]
fn too_many_ranges_are_refused() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(16, |n| (n / 2000).max(1));
    let cfg = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let strategy = (
        (MAX_RANGES_PER_MESSAGE - 2)..=(MAX_RANGES_PER_MESSAGE + 2),
        page_range(),
        0u64..1 << 20,
        proptest::option::of((any::<prop::sample::Index>(), page_range())),
    );
    let result = TestRunner::new(cfg).run(&strategy, |(n, first, stride, odd)| {
        // n ranges spread from `first`, one of them replaced by `odd` (maybe a bad one).
        let mut input: Vec<PageRange> = (0..n as u64)
            .map(|i| PageRange {
                start: first.start.wrapping_add(i.wrapping_mul(stride)) % (MAX_PFN / 2),
                count: first.count.clamp(1, 1 << 20),
            })
            .collect();
        if let Some((at, r)) = odd {
            let i = at.index(input.len());
            input[i] = r;
        }
        check_app_ranges(&input)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

const MARK: u8 = 0xa5;
/// Guest RAM: pages [0, 64) and [96, 128), one memfd; pages 64..96 and from 128 are a hole.
const LOW_PAGES: u64 = 64;
const HIGH_PFN: u64 = 96;
const HIGH_PAGES: u64 = 32;
const RAM_PAGES: u64 = LOW_PAGES + HIGH_PAGES;

fn is_ram(p: u64) -> bool {
    p < LOW_PAGES || (HIGH_PFN..HIGH_PFN + HIGH_PAGES).contains(&p)
}

fn ram_pages() -> impl Iterator<Item = u64> {
    (0..LOW_PAGES).chain(HIGH_PFN..HIGH_PFN + HIGH_PAGES)
}

struct Guest {
    mem: GuestMemoryMmap<()>,
}

impl Guest {
    fn new() -> Self {
        // The memfd mapped as vhost-user maps it; the regions keep it open.
        let ram = MemfdRam::new(RAM_PAGES * PAGE_SIZE).unwrap();
        let mem = ram
            .guest_memory(&[
                (0, 0, LOW_PAGES * PAGE_SIZE),
                (
                    HIGH_PFN * PAGE_SIZE,
                    LOW_PAGES * PAGE_SIZE,
                    HIGH_PAGES * PAGE_SIZE,
                ),
            ])
            .unwrap();
        let g = Guest { mem };
        for p in ram_pages() {
            g.use_page(p);
        }
        g
    }

    /// The guest writes to page `p` (it holds data again).
    fn use_page(&self, p: u64) {
        self.mem
            .write_obj(MARK, GuestAddress(p * PAGE_SIZE))
            .unwrap();
    }

    /// Whether page `p` reads as zeros (discarded).
    fn discarded(&self, p: u64) -> bool {
        self.mem
            .read_obj::<u8>(GuestAddress(p * PAGE_SIZE))
            .unwrap()
            == 0
    }
}

#[derive(Debug, Clone)]
enum Op {
    Inflated(Vec<PageRange>),
    Deflate(Vec<PageRange>),
    SetAppTarget(u64),
    SetDiscard(bool),
    /// The app went away (connection closed, or a new app said hello).
    AppGone,
    /// The discard worker runs what is pending.
    RunWorker,
}

/// Ranges around the small RAM: inside, across the hole, past the end, and junk.
fn app_range() -> impl Strategy<Value = PageRange> {
    prop_oneof![
        10 => (0u64..140, 1u64..24).prop_map(|(start, count)| PageRange { start, count }),
        1 => (start(), count()).prop_map(|(start, count)| PageRange { start, count }),
    ]
}

fn op(worker: bool) -> BoxedStrategy<Op> {
    let target = prop_oneof![
        (0u64..=140).prop_map(|p| p * PAGE_SIZE),
        (0u64..=140, 1u64..PAGE_SIZE).prop_map(|(p, r)| p * PAGE_SIZE + r),
        any::<u64>(),
    ];
    let common = prop_oneof![
        6 => vec(app_range(), 0..6).prop_map(Op::Inflated),
        3 => vec(app_range(), 0..4).prop_map(Op::Deflate),
        2 => target.prop_map(Op::SetAppTarget),
        1 => any::<bool>().prop_map(Op::SetDiscard),
    ];
    if worker {
        prop_oneof![12 => common, 2 => Just(Op::RunWorker), 1 => Just(Op::AppGone)].boxed()
    } else {
        prop_oneof![12 => common, 1 => Just(Op::AppGone)].boxed()
    }
}

/// What the app's balloon must be: the pages it holds, its target, whether discards are on,
/// and (with the worker) the pages whose discard is pending.
struct Model {
    app: BTreeSet<u64>,
    driver: BTreeSet<u64>,
    target: u64,
    discard: bool,
    pending: BTreeSet<u64>,
    outside_counted: u64,
}

impl Model {
    fn inflated(&mut self, ranges: &[PageRange]) -> Result<Vec<u64>, AppRangeError> {
        if ranges.len() > MAX_RANGES_PER_MESSAGE {
            return Err(AppRangeError::TooManyRanges(ranges.len()));
        }
        if let Some(bad) = first_bad(ranges) {
            return Err(AppRangeError::BadRange {
                start: bad.start,
                count: bad.count,
            });
        }
        let inside: Vec<u64> = ram_pages().filter(|p| union_contains(ranges, *p)).collect();
        let outside = union_len(ranges) - inside.len() as u64;
        if outside > 0 {
            self.outside_counted += outside;
            return Err(AppRangeError::OutsideRam(outside));
        }
        let driver = inside.iter().filter(|p| self.driver.contains(p)).count() as u64;
        if driver > 0 {
            return Err(AppRangeError::DriverPages(driver));
        }
        let new = inside.iter().filter(|p| !self.app.contains(p)).count() as u64;
        let room = bytes_to_pages(self.target).saturating_sub(self.app.len() as u64);
        if new > room {
            return Err(AppRangeError::OverTarget { new, room });
        }
        self.app.extend(inside.iter().copied());
        Ok(inside)
    }
}

/// Runs `ops` on a Balloon with the small RAM (with a discard worker driven by hand, or
/// discarding at once), checking after each against the model.
fn run_app_balloon(
    driver_pfns: Vec<u32>,
    target_pages: u64,
    worker: bool,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let guest = Guest::new();
    let mut b = Balloon::new(FeatureChoice::default(), None);
    // Before the memory table, the app's pages are refused.
    prop_assert_eq!(
        b.app_inflated(&[PageRange { start: 0, count: 1 }]),
        Err(AppRangeError::NoMemoryTable)
    );
    let discard_worker = worker.then(|| Arc::new(DiscardWorker::new()));
    if let Some(w) = &discard_worker {
        b = b.with_discard_worker(w.clone());
    }
    // As update_memory does it.
    b.set_memory(regions_of(&guest.mem));
    b.app.memory.replace_regions(regions_of(&guest.mem));
    let mut driver_pfns = driver_pfns;
    let driver_ranges = merge_pfns(&mut driver_pfns);
    b.memory.inflate(&driver_ranges, DiscardMode::Off);
    b.set_app_target(target_pages * PAGE_SIZE).unwrap();
    let mut m = Model {
        app: BTreeSet::new(),
        driver: driver_pfns
            .iter()
            .map(|p| u64::from(*p))
            .filter(|p| is_ram(*p))
            .collect(),
        target: target_pages * PAGE_SIZE,
        discard: true,
        pending: BTreeSet::new(),
        outside_counted: 0,
    };
    let outside_before = b.counters.rejected.pages_outside_ram;
    for op in ops {
        match op {
            Op::Inflated(ranges) => {
                let before = b.app.memory.ballooned_pages();
                let got = b.app_inflated(&ranges);
                let want = m.inflated(&ranges);
                prop_assert_eq!(
                    got.as_ref().err(),
                    want.as_ref().err(),
                    "inflated {:?}",
                    ranges
                );
                if let Ok(pages) = want {
                    let after = b.app.memory.ballooned_pages();
                    prop_assert!(
                        after <= before.max(bytes_to_pages(m.target)),
                        "{} pages tracked, target {} pages",
                        after,
                        bytes_to_pages(m.target)
                    );
                    if m.discard {
                        if worker {
                            m.pending.extend(pages);
                        } else {
                            // Discarded at once.
                            for p in pages {
                                prop_assert!(guest.discarded(p), "page {} not discarded", p);
                            }
                        }
                    }
                }
            }
            Op::Deflate(ranges) => {
                let got = b.app_deflate(&ranges);
                let want = match (ranges.len() > MAX_RANGES_PER_MESSAGE, first_bad(&ranges)) {
                    (true, _) => Err(AppRangeError::TooManyRanges(ranges.len())),
                    (false, Some(bad)) => Err(AppRangeError::BadRange {
                        start: bad.start,
                        count: bad.count,
                    }),
                    (false, None) => Ok(()),
                };
                prop_assert_eq!(
                    got.as_ref().err(),
                    want.as_ref().err(),
                    "deflate {:?}",
                    ranges
                );
                if got.is_ok() {
                    // Pages outside RAM are skipped and counted as rejected input.
                    let inside = ram_pages().filter(|p| union_contains(&ranges, *p)).count();
                    m.outside_counted += union_len(&ranges) - inside as u64;
                    // The ack is out: the guest uses the pages again at once.
                    let back: Vec<u64> = m
                        .app
                        .iter()
                        .copied()
                        .filter(|p| union_contains(&ranges, *p))
                        .collect();
                    for p in back {
                        m.app.remove(&p);
                        m.pending.remove(&p);
                        guest.use_page(p);
                    }
                }
            }
            Op::SetAppTarget(bytes) => {
                let got = b.set_app_target(bytes);
                let ok = bytes <= RAM_PAGES * PAGE_SIZE;
                prop_assert_eq!(got.is_ok(), ok, "app target {}: {:?}", bytes, got);
                if ok {
                    m.target = bytes;
                }
            }
            Op::SetDiscard(on) => {
                b.set_discard(on).unwrap();
                m.discard = on;
                if !on {
                    m.pending.clear(); // dropped by the worker
                }
            }
            // The guest reuses the app's pages at once: their queued discards must not land.
            Op::AppGone => {
                b.app_gone();
                for p in std::mem::take(&mut m.app) {
                    m.pending.remove(&p);
                    guest.use_page(p);
                }
            }
            Op::RunWorker => {
                if let Some(w) = &discard_worker {
                    w.process_pending();
                }
                for p in std::mem::take(&mut m.pending) {
                    prop_assert!(guest.discarded(p), "page {} not discarded by the worker", p);
                }
            }
        }
        // The tracking is exactly the model's: in RAM, never the driver's.
        prop_assert_eq!(b.app.memory.ballooned_pages(), m.app.len() as u64);
        for p in ram_pages() {
            let tracked = b
                .app
                .memory
                .tracked_pages(&[PfnRange { start: p, count: 1 }])
                == 1;
            prop_assert_eq!(tracked, m.app.contains(&p), "page {}", p);
            prop_assert!(
                !(tracked && m.driver.contains(&p)),
                "driver page {} taken",
                p
            );
            // Nothing the guest holds is ever discarded.
            if guest.discarded(p) {
                prop_assert!(m.app.contains(&p), "page {} discarded but the guest's", p);
            }
        }
        prop_assert_eq!(b.memory.ballooned_pages(), m.driver.len() as u64);
        prop_assert_eq!(
            b.status().app.ballooned_bytes,
            pages_to_bytes(m.app.len() as u64)
        );
        prop_assert_eq!(
            b.counters.rejected.pages_outside_ram - outside_before,
            m.outside_counted
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn app_inflated_tracks_only_ram_under_the_target(
        driver in vec(0u32..140, 0..24),
        target in 0u64..=RAM_PAGES,
        ops in vec(op(false), 1..24),
    ) {
        run_app_balloon(driver, target, false, ops)?;
    }

    #[test]
    fn app_discards_off_the_lock_never_hit_deflated_pages(
        driver in vec(0u32..140, 0..24),
        target in 0u64..=RAM_PAGES,
        ops in vec(op(true), 1..24),
    ) {
        run_app_balloon(driver, target, true, ops)?;
    }
}
