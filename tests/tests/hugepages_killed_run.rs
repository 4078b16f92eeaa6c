//! A run killed while it holds huge pages (SIGKILL, a CI timeout) gives them back at the next
//! reservation: the pool is the host's, and a leftover reservation keeps memory from it. In a
//! test binary of its own, since the killed child's reservation would otherwise meet the other
//! huge-page tests' threads.

use balloon_lab::hugepages::{HugePages, Reservation};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const CHILD: &str = "child_holds_huge_pages_until_killed";
const PAGES: u64 = 16;

fn pool() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Run only by the test below, as its child.
#[test]
#[ignore]
fn child_holds_huge_pages_until_killed() {
    let _pages = HugePages::reserve(PAGES).unwrap_or_else(|e| panic!("{e:?}"));
    println!("reserved");
    // Until the parent kills this process (it never closes our stdin).
    let _ = std::io::stdin().read_line(&mut String::new());
}

#[test]
fn a_killed_runs_huge_pages_return_at_the_next_reservation() {
    match HugePages::reserve(1) {
        Ok(_) => {}
        Err(Reservation::Unavailable(why)) => {
            eprintln!("SKIPPED: no huge pages: {why}");
            return;
        }
        Err(Reservation::Failed(e)) => panic!("{e}"),
    }
    let before = pool();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            CHILD,
            "--nocapture",
            "--test-threads=1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let reserved = lines.find(|l| l.as_ref().is_ok_and(|l| l.contains("reserved")));
    assert!(reserved.is_some(), "the child did not reserve");
    assert_eq!(pool(), before + PAGES);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        pool(),
        before + PAGES,
        "SIGKILL gives nothing back by itself"
    );

    let pages = HugePages::reserve(1).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(pool(), before + 1, "the killed run's pages went back first");
    drop(pages);
    assert_eq!(pool(), before);
}
