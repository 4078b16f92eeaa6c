use super::*;

/// The control socket under a connection flood: the release backend with LimitNOFILE 1024
/// (applied with prlimit(2) on it right after it started: its connection cap, 64, is the same
/// under either limit), 2000 idle connections to its control socket held open all along by
/// one thread (each one the server closes is connected again at once, so 2000 keep coming
/// back), and meanwhile a status request every 100 ms for 30 s on a new connection (2 s
/// timeout; connect and exchange timed; a reply after 2 s counts as unanswered). Compared with
/// the same requests for 5 s before the flood, in the same run.
pub(super) fn control_flood() -> Result<()> {
    use balloon_lab::flood::{self, Flood, Probe};
    use balloon_lab::LabError;
    const IDLE: usize = 2000;
    const LIMIT_NOFILE: u64 = 1024;
    const PERIOD: Duration = Duration::from_millis(100);
    const FLOOD_FOR: Duration = Duration::from_secs(30);
    const QUIET_FOR: Duration = Duration::from_secs(5);
    const TIMEOUT: Duration = Duration::from_secs(2);
    const MAX_LOG_BYTES: u64 = 1_000_000;
    let own_limit = flood::raise_own_fd_limit(8192);
    if own_limit < IDLE as u64 + 256 {
        return Err(LabError::Other(format!(
            "this process may open only {own_limit} descriptors, too few for {IDLE} connections"
        )));
    }
    let own_fds_before = flood::fd_count(std::process::id())?;
    let backend = Backend::start("bench-flood", &["--no-stats", "--no-free-page-reporting"])?;
    let pid = backend
        .pid()
        .ok_or_else(|| LabError::Other("the backend has no pid".into()))?;
    flood::set_fd_limit(pid, LIMIT_NOFILE)?;
    let limit = flood::fd_limit(pid)?;
    let socket = &backend.control_socket;
    let quiet = flood::status_loop(socket, PERIOD, QUIET_FOR, TIMEOUT, |_| {});
    let (fds_quiet, threads_quiet) = (flood::fd_count(pid)?, flood::thread_count(pid)?);
    let log_path = backend.dir.join("backend.log");
    let log_len = || std::fs::metadata(&log_path).map_or(0, |m| m.len());
    let log_before = log_len();
    let flooding = Flood::start(socket, IDLE)?;
    let ramp = flooding.wait_open(IDLE, Duration::from_secs(20))?;
    eprintln!(
        "{IDLE} idle connections open in {:.0} ms (backend limit {limit} descriptors)",
        ramp.as_secs_f64() * 1000.0
    );
    let (mut max_fds, mut max_threads, mut min_open) = (0u64, 0u64, u64::MAX);
    let cpu_before = flood::cpu_seconds(pid)?;
    let probes = flood::status_loop(socket, PERIOD, FLOOD_FOR, TIMEOUT, |sent| {
        max_fds = max_fds.max(flood::fd_count(pid).unwrap_or(0));
        max_threads = max_threads.max(flood::thread_count(pid).unwrap_or(0));
        let c = flooding.counts();
        min_open = min_open.min(c.open);
        if sent % 50 == 0 {
            eprintln!(
                "{sent} requests sent; flood: {} open, {} reconnects",
                c.open, c.reconnects
            );
        }
    });
    let backend_cpu = flood::cpu_seconds(pid)? - cpu_before;
    let (fds_end, threads_end) = (flood::fd_count(pid)?, flood::thread_count(pid)?);
    let counts = flooding.stop();
    let log_bytes = log_len().saturating_sub(log_before);
    // The backend's connections end as the flood's close; give its threads a moment.
    let settled = wait_for(
        "the backend to let go of the flood",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let fds = flood::fd_count(pid)?;
            Ok(if fds <= fds_quiet {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{fds} descriptors"))
            })
        },
    );
    let (fds_after, threads_after) = (flood::fd_count(pid)?, flood::thread_count(pid)?);
    let answers_after = backend.status().is_ok();
    let new_log = std::fs::read(&log_path).unwrap_or_default();
    let new_log = String::from_utf8_lossy(&new_log[(log_before as usize).min(new_log.len())..]);
    for line in new_log.lines().take(20) {
        eprintln!("backend.log: {line}");
    }
    let mut failures = std::collections::BTreeMap::<String, usize>::new();
    for p in &probes {
        if let Some(f) = &p.failure {
            *failures.entry(f.clone()).or_default() += 1;
        }
    }
    let unanswered = probes.iter().filter(|p| p.failure.is_some()).count();
    let (p50, p99, max) = (
        flood::latency_quantile(&probes, 0.5),
        flood::latency_quantile(&probes, 0.99),
        flood::latency_quantile(&probes, 1.0),
    );
    let baseline = flood::latency_quantile(&quiet, 0.99);
    let latencies = |ps: &[Probe]| -> Vec<f64> { ps.iter().map(|p| p.latency_ms).collect() };
    let samples = json!({
        "unanswered": unanswered,
        "p99_ms": p99,
        "log_bytes": log_bytes,
        "p50_ms": p50,
        "max_ms": max,
        "requests": probes.len(),
        "reconnects": counts.reconnects,
        "backend_fds": fds_end,
        "backend_cpu_s_during_flood": backend_cpu,
        "backend_threads": threads_end,
        "backend_fds_max": max_fds,
        "backend_threads_max": max_threads,
        "backend_fds_quiet": fds_quiet,
        "backend_threads_quiet": threads_quiet,
        "backend_fds_after": fds_after,
        "backend_threads_after": threads_after,
        "backend_fds_settled": settled.is_ok(),
        "backend_answers_after": answers_after,
        "backend_fd_limit": limit,
        "limit_applied": "prlimit(2) RLIMIT_NOFILE 1024/1024 on the backend right after it started",
        "idle_connections": IDLE,
        "flood_min_open": min_open,
        "flood_ramp_ms": ramp.as_secs_f64() * 1000.0,
        "flood": counts,
        "failures": failures,
        "latencies_ms": latencies(&probes),
        "quiet_requests": quiet.len(),
        "quiet_unanswered": quiet.iter().filter(|p| p.failure.is_some()).count(),
        "quiet_p50_ms": flood::latency_quantile(&quiet, 0.5),
        "quiet_latencies_ms": latencies(&quiet),
        "timeout_ms": TIMEOUT.as_millis() as u64,
        "period_ms": PERIOD.as_millis() as u64,
        "flood_s": FLOOD_FOR.as_secs(),
    });
    let runs = probes.len();
    drop(backend);
    let own_fds_after = flood::fd_count(std::process::id())?;
    if own_fds_after > own_fds_before {
        eprintln!("this process holds {own_fds_after} descriptors, {own_fds_before} before");
    }
    let mut samples = samples;
    samples["bench_fds_before"] = json!(own_fds_before);
    samples["bench_fds_after"] = json!(own_fds_after);
    BenchResult {
        name: "control_flood".into(),
        metric: "p99 status latency (connect + exchange) under 2000 idle connections".into(),
        unit: "ms".into(),
        value: p99,
        baseline,
        baseline_name: "p99 of the same status requests without the flood".into(),
        ratio: p99 / baseline,
        runs,
        goal: "unanswered == 0 and log_bytes < 1 MB".into(),
        goal_met: Some(unanswered == 0 && log_bytes < MAX_LOG_BYTES),
        samples,
    }
    .publish()
    .ctx(|| "publishing the result".into())
}
