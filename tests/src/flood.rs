//! Hostile load on a control socket, for the benchmarks: a flood of idle connections kept up
//! from one thread (every one the server closes is opened again at once), status requests
//! timed one by one, and what a process holds (descriptors, threads) read from /proc.

use crate::error::IoContext;
use crate::{LabError, Result};
use balloon_protocol::{ControlClient, ControlRequest};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the flood did, so far or in all.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct FloodCounts {
    /// Connections open now (at the end: when it stopped).
    pub open: u64,
    /// Successful connects, the first of each slot included.
    pub connects: u64,
    /// Connections the server ended that the flood opened again.
    pub reconnects: u64,
    /// Lines the server sent (refusals: "closed to make room ...").
    pub server_lines: u64,
    /// Connects refused with EAGAIN (the listen backlog full), retried 10 ms later.
    pub connect_busy: u64,
    /// Connects that failed otherwise, retried 10 ms later.
    pub connect_errors: u64,
    /// CPU time of the flood's thread (user and system), in milliseconds, once it stopped.
    pub cpu_ms: u64,
}

#[derive(Default)]
struct Counters {
    stop: AtomicBool,
    open: AtomicU64,
    connects: AtomicU64,
    reconnects: AtomicU64,
    server_lines: AtomicU64,
    connect_busy: AtomicU64,
    connect_errors: AtomicU64,
    cpu_ms: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> FloodCounts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FloodCounts {
            open: get(&self.open),
            connects: get(&self.connects),
            reconnects: get(&self.reconnects),
            server_lines: get(&self.server_lines),
            connect_busy: get(&self.connect_busy),
            connect_errors: get(&self.connect_errors),
            cpu_ms: get(&self.cpu_ms),
        }
    }
}

/// `connections` idle connections to a Unix socket, held open by one thread with epoll: they
/// never send a byte, read what the server sends, and each one the server ends is connected
/// again at once. Stopping (or dropping) closes every one of them.
pub struct Flood {
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

fn unix_addr(path: &Path) -> Result<libc::sockaddr_un> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(LabError::Other(format!(
            "socket path too long: {}",
            path.display()
        )));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    Ok(addr)
}

/// A non-blocking connect: a Unix socket is connected at once (queued in the server's
/// backlog) or refused with EAGAIN when the backlog is full.
fn connect(addr: &libc::sockaddr_un) -> io::Result<OwnedFd> {
    // SAFETY: socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just created and nobody else holds.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: connect(2) with an address we own, of its own size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(fd);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) {
        // Not seen for Unix sockets; should it fail later, epoll reports it as an end.
        Ok(fd)
    } else {
        Err(e)
    }
}

impl Flood {
    /// Opens `connections` connections to `path` and keeps them open from a thread of its own.
    pub fn start(path: &Path, connections: usize) -> Result<Flood> {
        let addr = unix_addr(path)?;
        // SAFETY: epoll_create1(2); the descriptor is owned at once.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(LabError::Other(format!(
                "epoll_create1: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: a descriptor we just created and nobody else holds.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("flood".into())
            .spawn(move || run(&addr, connections, &epoll, &c))
            .ctx(|| "starting the flood thread".into())?;
        Ok(Flood {
            counters,
            thread: Some(thread),
        })
    }

    pub fn counts(&self) -> FloodCounts {
        self.counters.snapshot()
    }

    /// Waits until all `connections` are open at once, up to `timeout`; returns how long it took.
    pub fn wait_open(&self, connections: usize, timeout: Duration) -> Result<Duration> {
        let t = Instant::now();
        while (self.counters.open.load(Ordering::Relaxed) as usize) < connections {
            if t.elapsed() > timeout {
                return Err(LabError::Other(format!(
                    "the flood has only {} of {connections} connections open after {timeout:?} ({:?})",
                    self.counters.open.load(Ordering::Relaxed),
                    self.counts()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(t.elapsed())
    }

    /// Closes every connection; returns the totals.
    pub fn stop(mut self) -> FloodCounts {
        self.halt();
        self.counters.snapshot()
    }

    fn halt(&mut self) {
        self.counters.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The flood's thread: connect every empty slot, read and reconnect on every end, until told
/// to stop. Every descriptor it opened is closed when it returns (slots and epoll are owned).
fn run(addr: &libc::sockaddr_un, n: usize, epoll: &OwnedFd, c: &Counters) {
    let mut slots: Vec<Option<OwnedFd>> = (0..n).map(|_| None).collect();
    let mut ever_open = vec![false; n];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = [0u8; 4096];
    let mut retry_at = Instant::now();
    while !c.stop.load(Ordering::Relaxed) {
        if Instant::now() >= retry_at {
            for (i, slot) in slots.iter_mut().enumerate() {
                if slot.is_some() {
                    continue;
                }
                let fd = match connect(addr) {
                    Ok(fd) => fd,
                    Err(e) => {
                        let counter = if e.raw_os_error() == Some(libc::EAGAIN) {
                            &c.connect_busy
                        } else {
                            &c.connect_errors
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        retry_at = Instant::now() + Duration::from_millis(10);
                        break;
                    }
                };
                let mut ev = libc::epoll_event {
                    events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                    u64: i as u64,
                };
                // SAFETY: epoll_ctl on our epoll and a descriptor we own.
                let rc = unsafe {
                    libc::epoll_ctl(
                        epoll.as_raw_fd(),
                        libc::EPOLL_CTL_ADD,
                        fd.as_raw_fd(),
                        &mut ev,
                    )
                };
                if rc != 0 {
                    c.connect_errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                c.connects.fetch_add(1, Ordering::Relaxed);
                if ever_open[i] {
                    c.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                ever_open[i] = true;
                c.open.fetch_add(1, Ordering::Relaxed);
                *slot = Some(fd);
            }
        }
        let waiting = slots.iter().any(Option::is_none);
        let timeout_ms = if waiting { 10 } else { 100 };
        // SAFETY: epoll_wait into a buffer we own, of the length we pass.
        let ready = unsafe {
            libc::epoll_wait(
                epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        for ev in events.iter().take(ready.max(0) as usize) {
            let i = ev.u64 as usize;
            let Some(fd) = &slots[i] else { continue };
            let mut ended =
                ev.events & (libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLRDHUP) as u32 != 0;
            loop {
                // SAFETY: read(2) into a buffer we own, of its length.
                let got = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if got > 0 {
                    let lines = buf[..got as usize].iter().filter(|&&b| b == b'\n').count();
                    c.server_lines.fetch_add(lines as u64, Ordering::Relaxed);
                    continue;
                }
                if got == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
                    ended = true;
                }
                break;
            }
            if ended {
                // Closing the descriptor takes it out of the epoll set.
                slots[i] = None;
                c.open.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
    c.open.store(0, Ordering::Relaxed);
    // SAFETY: getrusage fills the struct we pass; all zeroes is a valid one.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } == 0 {
        let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
        c.cpu_ms
            .store(ms(usage.ru_utime) + ms(usage.ru_stime), Ordering::Relaxed);
    }
}

/// One timed status request: connect and exchange.
#[derive(Debug, Clone)]
pub struct Probe {
    pub latency_ms: f64,
    /// Why it went unanswered (no reply, a refusal, or a reply after the timeout).
    pub failure: Option<String>,
}

/// Asks `socket` for the status with `timeout` on the connect and on the exchange; an answer
/// later than `timeout` in all counts as unanswered too.
pub fn ask_status(socket: &Path, timeout: Duration) -> Probe {
    let t = Instant::now();
    let reply = ControlClient::connect_with_timeout(socket, timeout)
        .map_err(|e| format!("connect: {e}"))
        .and_then(|mut c| {
            c.request(ControlRequest::Status {})
                .map_err(|e| format!("exchange: {e}"))
        });
    let took = t.elapsed();
    let failure = match reply {
        Ok(r) if r.ok && r.status.is_some() => {
            (took > timeout).then(|| format!("answered after {} ms", took.as_millis()))
        }
        Ok(r) => Some(format!("refused: {}", r.error.unwrap_or_default())),
        Err(e) => Some(e),
    };
    Probe {
        latency_ms: took.as_secs_f64() * 1000.0,
        failure,
    }
}

/// A status request every `period` for `duration`, each started on a thread of its own at its
/// time (a slow one does not delay the next: they overlap). `each` runs at every tick, after
/// the request of that tick started. Returns the probes in the order they were started.
pub fn status_loop(
    socket: &Path,
    period: Duration,
    duration: Duration,
    timeout: Duration,
    mut each: impl FnMut(usize),
) -> Vec<Probe> {
    let start = Instant::now();
    std::thread::scope(|scope| {
        let mut running = Vec::new();
        let mut tick = 0u32;
        while period * tick < duration {
            std::thread::sleep((start + period * tick).saturating_duration_since(Instant::now()));
            running.push(scope.spawn(move || ask_status(socket, timeout)));
            tick += 1;
            each(running.len());
        }
        running
            .into_iter()
            .map(|t| {
                t.join().unwrap_or_else(|_| Probe {
                    latency_ms: f64::NAN,
                    failure: Some("the probe's thread panicked".into()),
                })
            })
            .collect()
    })
}

/// The `p`-quantile (0..=1, nearest rank) of the probes' latencies, an unanswered one counting
/// as infinitely late (so it is infinite once more than 1 - p of them went unanswered).
pub fn latency_quantile(probes: &[Probe], p: f64) -> f64 {
    let mut v: Vec<f64> = probes
        .iter()
        .map(|q| {
            if q.failure.is_some() {
                f64::INFINITY
            } else {
                q.latency_ms
            }
        })
        .collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Descriptors `pid` has open.
pub fn fd_count(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .ctx(|| format!("reading {dir}"))?
        .count() as u64)
}

/// Threads of `pid`.
pub fn thread_count(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).ctx(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| LabError::Other(format!("no Threads: line in {path}")))
}

/// `pid`'s descriptor limit (soft and hard), as LimitNOFILE sets it.
pub fn set_fd_limit(pid: u32, limit: u64) -> Result<()> {
    let lim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: prlimit(2) with a struct we own; the old limit is not asked for.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(LabError::Other(format!(
            "prlimit({pid}, RLIMIT_NOFILE, {limit}): {}",
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// CPU time `pid` has used so far (user and system), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).ctx(|| format!("reading {path}"))?;
    // Fields after the command (in parentheses, which may hold spaces): utime and stime are
    // the 14th and 15th of the line, the 12th and 13th after it.
    let after = text.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) if hz > 0.0 => Ok((u + s) / hz),
        _ => Err(LabError::Other(format!("no utime/stime in {path}"))),
    }
}

/// `pid`'s soft descriptor limit as /proc shows it.
pub fn fd_limit(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/limits");
    let text = std::fs::read_to_string(&path).ctx(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| LabError::Other(format!("no open files limit in {path}")))
}

/// Raises this process's soft descriptor limit to at least `want` (up to the hard limit);
/// returns the limit now.
pub fn raise_own_fd_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur
}
