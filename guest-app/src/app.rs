//! The balloon application's loop: follow the host's target at an adaptive rate, report pinned
//! pages, give pages back only after the host acknowledged, deflate under sustained pressure.

use crate::chunk::{Chunk, ChunkError};
use crate::rate::RateController;
use crate::transport::Stream;
use balloon_protocol::app::{decode, encode, AppMessage, HostMessage, PageRange};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Settings {
    pub min_rate: u64,
    pub max_rate: u64,
    pub rate_step: u64,
    pub rate_divisor: u64,
    /// PSI "some avg10" above which the guest is under pressure.
    pub psi_threshold: f64,
    /// Ticks of pressure in a row after which the app gives memory back.
    pub pressure_ticks: u32,
    pub tick: Duration,
    /// The largest chunk claimed at once.
    pub max_chunk: u64,
    /// The per-VM secret presented in the hello (when the host requires one).
    pub secret: Option<String>,
    /// Where to write, every second, the PFN ranges reported to the host and the ones
    /// pagemap shows now (they must stay equal: pinned pages do not move).
    pub pfn_file: Option<std::path::PathBuf>,
    /// Memory the guest always keeps available: a chunk that would leave less is not claimed
    /// (claiming it could push the guest into its OOM killer).
    pub reserve: u64,
}

use crate::meminfo::mem_available;

/// How long a new app waits for the host's answer to its hello before its run loop (which
/// reports every second) starts.
const HELLO_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// PSI "some avg10" (percent) at or under which the guest counts as calm: the rate may start
/// from its headroom and double. Without PSI nothing says so, and the ramp stays additive.
const CALM_PSI: f64 = 1.0;

fn is_calm(psi: Option<f64>) -> bool {
    psi.is_some_and(|p| p <= CALM_PSI)
}

pub struct App {
    settings: Settings,
    writer: Box<dyn Stream>,
    replies: Receiver<HostMessage>,
    pagemap: File,
    chunks: Vec<Chunk>,
    target: u64,
    seq: u64,
    rate: RateController,
    stalled: bool,
    pressure_run: u32,
    last_state: Instant,
    /// When the next chunk may be claimed (the rate's pacing).
    next_step: Instant,
    /// The host refused this app: the loop ends.
    refused: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("the host channel closed")]
    Closed,
    #[error("writing to the host: {0}")]
    Write(std::io::Error),
    #[error("no answer from the host for message {0}")]
    NoAck(u64),
    #[error("{0}")]
    Setup(String),
    #[error("the host refused this app: {0}")]
    Refused(String),
}

/// Reads host messages into a channel; the connection stays readable across virtio-serial
/// host disconnects (reads return EOF until the host is back).
fn reader_thread(mut stream: Box<dyn Stream>, tx: std::sync::mpsc::Sender<HostMessage>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(&mut stream);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => std::thread::sleep(Duration::from_millis(100)),
                Ok(_) => match decode::<HostMessage>(line.trim()) {
                    Ok(m) => {
                        if tx.send(m).is_err() {
                            return;
                        }
                    }
                    Err(e) => log::warn!("host sent a bad message: {e}"),
                },
                Err(e) => {
                    log::warn!("reading from the host: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });
}

impl App {
    pub fn new(settings: Settings, stream: Box<dyn Stream>) -> Result<App, AppError> {
        let pagemap = File::open("/proc/self/pagemap")
            .map_err(|e| AppError::Setup(format!("/proc/self/pagemap: {e}")))?;
        let reader = stream
            .try_clone_box()
            .map_err(|e| AppError::Setup(e.to_string()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        reader_thread(reader, tx);
        let rate = RateController::new(
            settings.min_rate,
            settings.max_rate,
            settings.rate_step,
            settings.rate_divisor,
        );
        let mut app = App {
            settings,
            writer: stream,
            replies: rx,
            pagemap,
            chunks: Vec::new(),
            target: 0,
            seq: 0,
            rate,
            stalled: false,
            pressure_run: 0,
            last_state: Instant::now() - Duration::from_secs(10),
            next_step: Instant::now(),
            refused: None,
        };
        let secret = app.settings.secret.clone();
        let hello = app.send(AppMessage::Hello {
            pid: std::process::id(),
            secret,
        });
        // The host answers a hello with the target, or refuses the app (then it closes the
        // connection, and the write may already have failed). A host not connected yet (a
        // virtio-serial port whose host side comes later) answers once it is, and the run
        // loop takes the answer then. The wait stays well under the host's silence limit
        // (5 s): an app that waited that long for a slow answer was dropped for silence.
        match app.replies.recv_timeout(HELLO_ANSWER_WAIT) {
            Ok(HostMessage::Refused { reason }) => return Err(AppError::Refused(reason)),
            Ok(other) => app.on_host(other),
            Err(_) => {}
        }
        hello?;
        Ok(app)
    }

    pub fn held(&self) -> u64 {
        self.chunks.iter().map(|c| c.len as u64).sum()
    }

    fn send(&mut self, msg: AppMessage) -> Result<(), AppError> {
        self.writer
            .write_all(encode(msg).as_bytes())
            .map_err(AppError::Write)
    }

    fn on_host(&mut self, msg: HostMessage) {
        if let HostMessage::Refused { reason } = &msg {
            // The host closes the connection after this (or already did: a backend that
            // restarted, or dropped this app, refuses its next message on the new session).
            // The loop ends, the process exits and frees what it pinned, and its unit starts
            // it again with a fresh hello.
            log::error!("the host refused this app: {reason}");
            self.refused = Some(reason.clone());
        }
        if let HostMessage::Target { bytes } = msg {
            if bytes != self.target {
                log::info!("target {} MiB", bytes >> 20);
                if bytes > self.held() && self.target <= self.held() {
                    // A new inflation: start from what the guest can give now.
                    let headroom = mem_available()
                        .unwrap_or(0)
                        .saturating_sub(self.settings.reserve);
                    self.rate.start(headroom, is_calm(crate::psi::read()));
                }
                self.target = bytes;
                self.stalled = false;
            }
        }
    }

    /// Waits for the host's answer to `seq`, handling targets that arrive meanwhile.
    fn wait_answer(&mut self, seq: u64) -> Result<Result<(), String>, AppError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                Ok(HostMessage::Ack { seq: s }) if s == seq => return Ok(Ok(())),
                Ok(HostMessage::Nack { seq: s, reason }) if s == seq => return Ok(Err(reason)),
                Ok(other) => self.on_host(other),
                Err(RecvTimeoutError::Timeout) => return Err(AppError::NoAck(seq)),
                Err(RecvTimeoutError::Disconnected) => return Err(AppError::Closed),
            }
        }
    }

    /// Claims one chunk toward the target if the guest can give it. Whatever happens, the
    /// next step waits for `next_step`: right after a claim only as long as the rate says,
    /// otherwise a whole tick (so a step that claims nothing never spins).
    fn inflate_step(&mut self, calm: bool) -> Result<(), AppError> {
        let started = Instant::now();
        self.next_step = started + self.settings.tick;
        let want = self.target - self.held();
        let step = (self.rate.rate() as f64 * self.settings.tick.as_secs_f64()) as u64;
        let len = want
            .min(step.max(crate::pagemap::PAGE))
            .min(self.settings.max_chunk);
        let len = crate::chunk::claim_len(len) as usize;
        if len == 0 {
            return Ok(());
        }
        if mem_available().is_some_and(|a| a < len as u64 + self.settings.reserve) {
            if !self.stalled {
                log::info!(
                    "the guest has too little memory available to give {} MiB more; holding at {} MiB",
                    len >> 20,
                    self.held() >> 20
                );
            }
            self.rate.failure();
            self.stalled = true;
            return Ok(());
        }
        match Chunk::claim(len, &self.pagemap) {
            Ok(chunk) => {
                self.seq += 1;
                let seq = self.seq;
                self.send(AppMessage::Inflated {
                    seq,
                    ranges: chunk.ranges.clone(),
                })?;
                match self.wait_answer(seq)? {
                    Ok(()) => {
                        self.chunks.push(chunk);
                        // The next chunk comes when this one's share of the rate is used up
                        // (at once if claiming it took longer).
                        let pace = Duration::from_secs_f64(len as f64 / self.rate.rate() as f64);
                        self.next_step = started + pace;
                        self.rate.success(calm);
                    }
                    Err(reason) => {
                        log::warn!("host refused {} MiB: {reason}", len >> 20);
                        // The host did not take them; the guest can have them straight back.
                        drop(chunk);
                        self.rate.failure();
                        self.stalled = true;
                    }
                }
            }
            Err(ChunkError::NoMemory(e)) => {
                log::info!(
                    "the guest cannot spare {} KiB now ({e}); slowing down",
                    len >> 10
                );
                self.rate.failure();
                self.stalled = true;
            }
            Err(e) => {
                log::error!("{e}");
                self.rate.failure();
                self.stalled = true;
            }
        }
        Ok(())
    }

    /// Gives the newest chunk back: tells the host, waits for its ack, then releases it.
    pub fn deflate_one(&mut self) -> Result<bool, AppError> {
        let Some(chunk) = self.chunks.pop() else {
            return Ok(false);
        };
        self.seq += 1;
        let seq = self.seq;
        let ranges: Vec<PageRange> = chunk.ranges.clone();
        self.send(AppMessage::Deflate { seq, ranges })?;
        match self.wait_answer(seq) {
            Ok(_) => {
                drop(chunk);
                Ok(true)
            }
            Err(e) => {
                // Without the host's word the pages must stay pinned and held.
                self.chunks.push(chunk);
                Err(e)
            }
        }
    }

    fn write_pfn_file(&self) {
        let Some(path) = &self.settings.pfn_file else {
            return;
        };
        let reported: Vec<PageRange> = self.chunks.iter().flat_map(|c| c.ranges.clone()).collect();
        let current = crate::pagemap::coalesce(self.current_pfns().into_iter().flatten().collect());
        let text = serde_json::json!({ "reported": crate::pagemap::coalesce(
            reported.iter().flat_map(|r| r.start..r.start + r.count).collect()
        ), "current": current })
        .to_string();
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .is_err()
        {
            log::warn!("cannot write {}", path.display());
        }
    }

    fn report_state(&mut self, psi: Option<f64>) -> Result<(), AppError> {
        self.last_state = Instant::now();
        self.write_pfn_file();
        self.send(AppMessage::State {
            held_bytes: self.held(),
            rate_bytes_per_s: self.rate.rate(),
            psi_some_avg10: psi,
            stalled: self.stalled,
            meminfo: crate::meminfo::read(),
        })
    }

    /// Runs until `stop`, then gives everything back.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), AppError> {
        while !stop.load(Ordering::Relaxed) {
            while let Ok(m) = self.replies.try_recv() {
                self.on_host(m);
            }
            let psi = crate::psi::read();
            let mut inflating = false;
            let pressure = psi.is_some_and(|p| p > self.settings.psi_threshold);
            self.pressure_run = if pressure { self.pressure_run + 1 } else { 0 };
            if self.pressure_run >= self.settings.pressure_ticks {
                // Sustained pressure: protect the guest before the target.
                log::warn!("memory pressure (PSI some avg10 {psi:?}): giving memory back");
                self.deflate_one()?;
                self.rate.failure();
                self.stalled = true;
            } else if self.held() > self.target {
                self.deflate_one()?;
            } else if self.held() < self.target && !pressure {
                self.inflate_step(is_calm(psi))?;
                inflating = true;
            } else if pressure {
                self.rate.failure();
            }
            if self.last_state.elapsed() >= Duration::from_secs(1) {
                self.report_state(psi)?;
            }
            // Pace: the next step when `inflate_step` said (sooner than a tick only right
            // after a chunk was claimed); otherwise a tick, so pressure counts per tick.
            let wait = if inflating {
                self.next_step
                    .saturating_duration_since(Instant::now())
                    .min(self.settings.tick)
            } else {
                self.settings.tick
            };
            if let Ok(m) = self.replies.recv_timeout(wait) {
                self.on_host(m);
            }
            if let Some(reason) = self.refused.take() {
                return Err(AppError::Refused(reason));
            }
        }
        log::info!("stopping: giving {} MiB back", self.held() >> 20);
        while self.deflate_one()? {}
        self.report_state(crate::psi::read())?;
        Ok(())
    }

    /// The PFNs the app holds now, chunk by chunk (for checks that nothing moved).
    pub fn current_pfns(&self) -> Vec<Vec<u64>> {
        self.chunks
            .iter()
            .filter_map(|c| c.current_pfns(&self.pagemap).ok())
            .collect()
    }
}
