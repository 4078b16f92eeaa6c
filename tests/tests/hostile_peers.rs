//! The backend process against hostile peers on its real sockets (no VM: a memfd guest behind
//! an in-process vhost-user frontend): guest processes on the app channel, local clients on
//! the control socket, planted files, and a second backend on the same paths. Each test is one
//! finding of the safety review and failed on the code before the fix.

use balloon_lab::backend::Backend;
use balloon_lab::frontend::{guest_ram, MemfdRam, TestFrontend};
use balloon_lab::wait::{wait_for, Poll};
use balloon_lab::{lab, MIB};
use balloon_protocol::app::{decode, encode, AppMessage, HostMessage, PageRange};
use balloon_protocol::lines::LineClient;
use balloon_protocol::{BackendStatus, ControlClient, ControlRequest};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
const SECRET: &str = "4f1c2b9e8d7a6f5e4d3c2b1a09f8e7d6";
const NO_EXTRA_QUEUES: &[&str] = &["--no-stats", "--no-free-page-reporting"];

/// Held by the tests that bound answer times and by the flood: on two cores a flood beside a
/// timed test measures the machine, not the backend.
static TIMED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn timed() -> std::sync::MutexGuard<'static, ()> {
    TIMED.lock().unwrap_or_else(|e| e.into_inner())
}

/// A private secret file in `dir`.
fn secret_file(dir: &Path) -> PathBuf {
    let p = dir.join("app-secret");
    std::fs::write(&p, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A backend whose app channel requires the secret, and a 64 MiB memfd guest attached.
struct Guest {
    backend: Backend,
    ram: MemfdRam,
    fe: TestFrontend,
}

impl Guest {
    fn start(name: &str) -> Guest {
        Self::with_ram(name, 64 * MIB)
    }

    fn with_ram(name: &str, bytes: u64) -> Guest {
        let dir = lab::run_dir(&format!("{name}-secret")).unwrap();
        let secret = secret_file(&dir);
        let mut args: Vec<&str> = NO_EXTRA_QUEUES.to_vec();
        args.extend(["--app-secret-file", secret.to_str().unwrap()]);
        let backend = Backend::start(name, &args).unwrap();
        let ram = guest_ram(bytes).unwrap();
        ram.populate();
        let fe = TestFrontend::connect(&backend.socket, &ram).unwrap();
        wait_for(
            "the memory table",
            Duration::from_secs(10),
            Duration::from_millis(10),
            || {
                let s = backend.status()?;
                Ok(if s.guest_ram_bytes > 0 {
                    Poll::Ready(())
                } else {
                    Poll::Pending("no RAM yet".into())
                })
            },
        )
        .unwrap();
        Guest { backend, ram, fe }
    }

    fn app(&self) -> LineClient {
        LineClient::connect(&self.backend.app_socket, Duration::from_secs(5)).unwrap()
    }

    fn status(&self) -> BackendStatus {
        self.backend.status().unwrap()
    }

    fn set_app_target(&self, bytes: u64) {
        let r = self
            .backend
            .request(ControlRequest::SetAppTarget {
                target_bytes: bytes,
            })
            .unwrap();
        assert!(r.ok, "{r:?}");
    }
}

fn send(c: &mut LineClient, msg: AppMessage) -> HostMessage {
    decode::<HostMessage>(c.exchange(&encode(msg)).unwrap().trim()).unwrap()
}

fn hello(secret: Option<&str>) -> AppMessage {
    AppMessage::Hello {
        pid: 4242,
        secret: secret.map(String::from),
    }
}

/// Reads host messages until one that is not a target.
fn answer(c: &mut LineClient) -> HostMessage {
    loop {
        let m = decode::<HostMessage>(c.read_line().unwrap().trim()).unwrap();
        if !matches!(m, HostMessage::Target { .. }) {
            return m;
        }
    }
}

fn inflated(seq: u64, ranges: &[(u64, u64)]) -> AppMessage {
    AppMessage::Inflated {
        seq,
        ranges: ranges
            .iter()
            .map(|&(start, count)| PageRange { start, count })
            .collect(),
    }
}

#[test]
fn no_guest_process_without_the_secret_can_discard_guest_memory() {
    let mut g = Guest::start("hostile-app");
    for pfn in [0, 100, 8000] {
        g.ram.fill_page(pfn, 0xa5);
    }
    let full = g.ram.allocated();
    g.set_app_target(8 * MIB);

    // Finding 1: no hello at all, the whole address space.
    let mut c = g.app();
    let reply = send(&mut c, inflated(1, &[(0, u64::MAX)]));
    assert!(matches!(reply, HostMessage::Refused { .. }), "{reply:?}");
    assert!(c.read_line().is_err(), "the connection must end");
    // A hello without the secret, and one with a wrong secret.
    for secret in [None, Some("0000000000000000000000000000000")] {
        let mut c = g.app();
        let reply = send(&mut c, hello(secret));
        assert!(matches!(reply, HostMessage::Refused { .. }), "{reply:?}");
        assert!(c.read_line().is_err());
    }
    assert!(!g.status().app.connected);

    // Connections that never speak do not hold the slot: the real app still gets in. (The
    // server accepts in the order of connecting, so the app comes after every squatter.)
    let squatters: Vec<UnixStream> = (0..10)
        .map(|_| UnixStream::connect(&g.backend.app_socket).unwrap())
        .collect();
    let mut app = g.app();
    app.exchange(&encode(hello(Some(SECRET))))
        .expect("the real app gets in beside squatters");
    assert!(g.status().app.connected);
    drop(squatters);

    // The authenticated app is held to its target and to guest RAM.
    for (ranges, what) in [
        (vec![(0, u64::MAX)], "beyond 64-bit"),
        (vec![(u64::MAX - 1, 2)], "beyond 64-bit"),
        (vec![(g.ram.len() / PAGE + 16, 100)], "outside guest RAM"),
        (vec![(0, 4096)], "exceed the app target"),
    ] {
        app.send(&encode(inflated(2, &ranges))).unwrap();
        let reply = answer(&mut app);
        match reply {
            HostMessage::Nack { reason, .. } => {
                assert!(reason.contains(what), "{ranges:?}: {reason}")
            }
            other => panic!("{ranges:?}: {other:?}"),
        }
    }
    assert_eq!(g.status().app.ballooned_bytes, 0);
    assert_eq!(
        g.ram.allocated(),
        full,
        "a refused message discarded memory"
    );
    for pfn in [0, 100, 8000] {
        assert!(g.ram.page_is(pfn, 0xa5), "page {pfn} lost its content");
    }
    // Pages in the driver's balloon are not the app's to report.
    g.backend.set_target(MIB).unwrap();
    g.fe.inflate(&g.ram, &(2000..2256).collect::<Vec<u32>>())
        .unwrap();
    app.send(&encode(inflated(3, &[(2100, 10)]))).unwrap();
    let reply = answer(&mut app);
    assert!(
        matches!(&reply, HostMessage::Nack { reason, .. } if reason.contains("driver")),
        "{reply:?}"
    );
    // What the app may give, it gives.
    app.send(&encode(inflated(4, &[(100, 256)]))).unwrap();
    assert!(matches!(answer(&mut app), HostMessage::Ack { seq: 4 }));
    wait_for(
        "the app's pages to leave",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            Ok(if g.ram.page_is(100, 0) {
                Poll::Ready(())
            } else {
                Poll::Pending("page 100 still there".into())
            })
        },
    )
    .unwrap();
    assert!(g.ram.page_is(0, 0xa5) && g.ram.page_is(8000, 0xa5));
    assert_eq!(g.status().app.ballooned_bytes, 256 * PAGE);
}

/// What an answer may take while a peer misbehaves beside it: well under the 2 s the backend
/// gives a write to a peer that does not read, which is what a request stuck behind that
/// peer would wait (a loaded 2-core CI machine has shown 262 ms without any such wait).
const PROMPT: Duration = Duration::from_secs(1);

/// The longest a status or config read took while `work` ran beside it.
fn slowest_answers_while(g: &mut Guest, work: impl FnOnce() + Send) -> (Duration, Duration) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut status_worst = Duration::ZERO;
    let mut config_worst = Duration::ZERO;
    let control = g.backend.control_socket.clone();
    std::thread::scope(|s| {
        s.spawn(|| {
            // Stops the sampling however `work` ends (a failed assertion in it too).
            struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
            impl Drop for Stop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let _stop = Stop(&stop);
            work();
        });
        let mut c = ControlClient::connect(&control).unwrap();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            assert!(c.request(ControlRequest::Status {}).unwrap().ok);
            status_worst = status_worst.max(t.elapsed());
            let t = Instant::now();
            g.fe.config().unwrap();
            config_worst = config_worst.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    (status_worst, config_worst)
}

#[test]
fn a_guest_app_that_never_reads_cannot_freeze_its_backend() {
    let _alone = timed();
    let mut g = Guest::start("no-read");
    // Finding 2: an authenticated app that stops reading (a guest not reading its port).
    let mut app = UnixStream::connect(&g.backend.app_socket).unwrap();
    app.write_all(encode(hello(Some(SECRET))).as_bytes())
        .unwrap();
    wait_for(
        "the app to connect",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            Ok(if g.backend.status()?.app.connected {
                Poll::Ready(())
            } else {
                Poll::Pending("not yet".into())
            })
        },
    )
    .unwrap();
    let (status, config) = {
        let control = g.backend.control_socket.clone();
        slowest_answers_while(&mut g, move || {
            let mut c = ControlClient::connect(&control).unwrap();
            // Far more target lines than the socket buffer holds.
            for i in 0..20_000u64 {
                let r = c
                    .request(ControlRequest::SetAppTarget {
                        target_bytes: (i % 4) * MIB,
                    })
                    .unwrap();
                assert!(r.ok, "{r:?}");
            }
        })
    };
    assert!(status < PROMPT, "status took {status:?}");
    assert!(config < PROMPT, "a config read took {config:?}");
    // The peer that did not read was dropped.
    assert!(!g.backend.status().unwrap().app.connected);
    drop(app);
}

#[test]
fn a_huge_app_message_does_not_hold_up_config_reads() {
    let _alone = timed();
    let mut g = Guest::with_ram("huge-line", 300 * MIB);
    g.set_app_target(200 * MIB);
    let mut app = g.app();
    app.exchange(&encode(hello(Some(SECRET)))).unwrap();
    // A line just under the 1 MiB limit with 36000 scattered pages (discarded under the device
    // lock, it held it for well over 100 ms), then the most ranges a message may carry.
    let scattered = |n: u64| -> Vec<(u64, u64)> { (0..n).map(|i| (2 * i, 1)).collect() };
    let most = balloon_protocol::app::MAX_RANGES_PER_MESSAGE as u64;
    let huge = encode(inflated(1, &scattered(36_000)));
    assert!(huge.len() < balloon_protocol::app::MAX_LINE_BYTES);
    let allowed = encode(inflated(2, &scattered(most)));
    let app = &mut app;
    let (status, config) = slowest_answers_while(&mut g, move || {
        app.send(&huge).unwrap();
        let reply = answer(app);
        assert!(
            matches!(&reply, HostMessage::Nack { seq: 1, reason } if reason.contains("ranges in one message")),
            "{reply:?}"
        );
        app.send(&allowed).unwrap();
        assert!(matches!(answer(app), HostMessage::Ack { seq: 2 }));
    });
    assert!(status < PROMPT, "status took {status:?}");
    assert!(config < PROMPT, "config took {config:?}");
    assert_eq!(g.status().app.ballooned_bytes, most * PAGE);
}

/// Runs the backend binary with `args` and expects it to exit at once with an error; returns
/// what it printed.
fn failed_start(args: &[&str]) -> String {
    let exe = lab::workspace_binary("vhost-balloon-backend").unwrap();
    let mut child = std::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stderr).to_string()
                + &String::from_utf8_lossy(&out.stdout);
            assert!(!status.success(), "the backend started: {text}");
            return text;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the backend did not exit with an error: {args:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_refused_request_is_never_saved_and_targets_above_ram_are_cut() {
    let mut backend = Backend::start("state-valid", NO_EXTRA_QUEUES).unwrap();
    // Finding 3: refused, and nothing saved.
    let r = backend
        .request(ControlRequest::SetStatsInterval { seconds: u64::MAX })
        .unwrap();
    assert!(!r.ok);
    assert!(r.error.unwrap().contains("statistics interval"));
    // A target above any RAM, while RAM is unknown.
    assert!(backend.set_target(1 << 40).is_ok());
    backend.kill();
    backend
        .restart()
        .expect("a refused request bricked the restart");
    let ram = guest_ram(64 * MIB).unwrap();
    let _fe = TestFrontend::connect(&backend.socket, &ram).unwrap();
    wait_for(
        "the target cut to guest RAM",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            let s = backend.status()?;
            Ok(
                if s.target_bytes <= s.guest_ram_bytes && s.guest_ram_bytes > 0 {
                    Poll::Ready(())
                } else {
                    Poll::Pending(format!(
                        "target {} of {}",
                        s.target_bytes, s.guest_ram_bytes
                    ))
                },
            )
        },
    )
    .unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&backend.state_file).unwrap()).unwrap();
    assert_eq!(saved["target_pages"].as_u64().unwrap() * PAGE, ram.len());
    // A state file of another version is refused by name, and not overwritten.
    let state = backend.state_file.clone();
    let dir = backend.dir.clone();
    drop(_fe);
    backend.kill();
    let v2 = r#"{"version":2,"target_pages":0,"stats_interval_seconds":5,"discard_enabled":true}"#;
    std::fs::write(&state, v2).unwrap();
    let text = failed_start(&[
        "--socket",
        dir.join("v2.sock").to_str().unwrap(),
        "--state-file",
        state.to_str().unwrap(),
    ]);
    assert!(text.contains("version 2"), "{text}");
    assert_eq!(std::fs::read_to_string(&state).unwrap(), v2);
}

#[test]
fn state_files_never_follow_planted_links_and_are_named_beside_the_state() {
    let dir = lab::run_dir("planted").unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    // Finding 6: where the old code put its temporary file (`with_extension`).
    let backend = Backend::start("planted", NO_EXTRA_QUEUES).unwrap();
    for name in ["state.tmp", "state.json.tmp"] {
        std::os::unix::fs::symlink(&victim, backend.dir.join(name)).unwrap();
    }
    backend.set_target(4 * MIB).unwrap();
    backend.set_target(8 * MIB).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let ram = guest_ram(64 * MIB).unwrap();
    let _fe = TestFrontend::connect(&backend.socket, &ram).unwrap();
    let pages = backend.dir.join("state.json.pages");
    wait_for(
        "STATE.pages",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            Ok(if pages.exists() {
                Poll::Ready(())
            } else {
                Poll::Pending("missing".into())
            })
        },
    )
    .unwrap();
    assert!(backend.dir.join("state.json.lock").exists());
    // `s.state` and `s.json` are two state files, not one lock.
    let shared = lab::run_dir("collide").unwrap();
    let mut one = Vec::new();
    for (i, state) in ["s.state", "s.json"].iter().enumerate() {
        let exe = lab::workspace_binary("vhost-balloon-backend").unwrap();
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("--socket")
            .arg(shared.join(format!("v{i}.sock")))
            .arg("--control-socket")
            .arg(shared.join(format!("c{i}.sock")))
            .arg("--state-file")
            .arg(shared.join(state))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        lab::die_with_parent(&mut cmd);
        one.push(cmd.spawn().unwrap());
    }
    for i in 0..2 {
        let c = shared.join(format!("c{i}.sock"));
        wait_for(
            "both backends",
            Duration::from_secs(10),
            Duration::from_millis(10),
            || {
                Ok(match ControlClient::connect(&c) {
                    Ok(_) => Poll::Ready(()),
                    Err(e) => Poll::Pending(e.to_string()),
                })
            },
        )
        .unwrap();
    }
    for mut c in one {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn binding_never_destroys_a_file_or_takes_a_live_socket() {
    let backend = Backend::start("bind", NO_EXTRA_QUEUES).unwrap();
    let dir = backend.dir.clone();
    // Finding 7: a regular file where a socket should go.
    let data = dir.join("data.txt");
    std::fs::write(&data, "precious").unwrap();
    let text = failed_start(&[
        "--socket",
        dir.join("other.sock").to_str().unwrap(),
        "--control-socket",
        data.to_str().unwrap(),
    ]);
    assert!(text.contains("not a socket"), "{text}");
    assert_eq!(std::fs::read_to_string(&data).unwrap(), "precious");
    // A second backend on the first one's live sockets.
    for args in [
        vec!["--socket", backend.socket.to_str().unwrap()],
        vec![
            "--socket",
            dir.join("third.sock").to_str().unwrap(),
            "--control-socket",
            backend.control_socket.to_str().unwrap(),
        ],
    ] {
        let text = failed_start(&args);
        assert!(text.contains("another process is serving"), "{text}");
    }
    assert!(
        backend.status().is_ok(),
        "the first backend lost its socket"
    );
    assert!(backend.socket.exists() && backend.control_socket.exists());
    // Every socket is the owner's only, whatever the umask.
    for p in [
        &backend.socket,
        &backend.control_socket,
        &backend.app_socket,
    ] {
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
}

/// Raises this process's descriptor limit (the floods below open many connections).
fn raise_own_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = want.min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// Lowers the backend's descriptor limit, as LimitNOFILE would.
fn limit_fds(pid: u32, n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: prlimit on our child with a struct we own.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Opens `idle` connections to the control socket and keeps them, then asks for the status
/// every 100 ms for `seconds`: returns how many went unanswered and the log's growth.
fn flood(backend: &Backend, idle: usize, seconds: u64) -> (usize, usize) {
    let log_before = backend.log().len();
    let held: Vec<UnixStream> = (0..idle)
        .filter_map(|_| UnixStream::connect(&backend.control_socket).ok())
        .collect();
    assert!(held.len() >= idle / 2, "could only open {}", held.len());
    let mut unanswered = 0;
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        let answered =
            ControlClient::connect_with_timeout(&backend.control_socket, Duration::from_secs(2))
                .and_then(|mut c| c.request(ControlRequest::Status {}))
                .is_ok_and(|r| r.ok);
        if !answered {
            unanswered += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(held);
    (unanswered, backend.log().len().saturating_sub(log_before))
}

#[test]
fn a_connection_flood_neither_spins_nor_locks_the_operator_out() {
    let _alone = timed();
    raise_own_fd_limit(8192);
    let backend = Backend::start("flood", NO_EXTRA_QUEUES).unwrap();
    let pid = backend.pid().unwrap();
    // Finding 4: far more idle connections than the descriptor limit allows.
    limit_fds(pid, 256);
    let (unanswered, log_growth) = flood(&backend, 1000, 3);
    assert_eq!(unanswered, 0, "status requests went unanswered");
    assert!(log_growth < 100_000, "the log grew by {log_growth} bytes");
    // Right at the descriptor limit: accept fails with EMFILE; it is backed off and logged
    // rarely, and idle connections are closed to make room.
    let open_now = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    limit_fds(pid, open_now + 6);
    let (unanswered, log_growth) = flood(&backend, 300, 3);
    assert_eq!(unanswered, 0, "status requests went unanswered at EMFILE");
    assert!(log_growth < 100_000, "the log grew by {log_growth} bytes");
    assert!(backend.status().is_ok());
}

/// An unprivileged guest user on a secret-protected transport opens every free slot of the app
/// channel and sends a blank line every 200 ms, never a hello; the app, restarted meanwhile,
/// still gets in (before: refused, "too many connections (4 open, all busy)", for as long as the
/// blank lines came: they reset the idle deadline and protected the squatter from eviction).
/// And lines before a hello are capped near a hello's size, so four 1 MiB lines from peers
/// that never said who they are cost the backend nothing (before: 16 -> 145 MB resident, each
/// parsed into JSON first).
#[test]
fn peers_that_never_say_hello_neither_lock_the_app_out_nor_grow_the_backend() {
    let _t = timed();
    let g = Guest::start("squat-blank");
    let socket = g.backend.app_socket.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holding = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let squatters: Vec<_> = (0..4)
        .map(|_| {
            let socket = socket.clone();
            let stop = stop.clone();
            let holding = holding.clone();
            std::thread::spawn(move || {
                let mut conn: Option<UnixStream> = None;
                let mut writes = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let c = match conn.take() {
                        Some(c) => c,
                        None => match UnixStream::connect(&socket) {
                            Ok(c) => c,
                            Err(_) => continue,
                        },
                    };
                    // Reconnect at once when dropped, to take the slot again.
                    if (&c).write_all(b"\n").is_ok() {
                        conn = Some(c);
                        writes += 1;
                        if writes == 2 {
                            holding.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        })
        .collect();
    // The squatters hold every slot, blank lines flowing, before the app comes.
    wait_for(
        "4 squatters to hold their slots",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || {
            let n = holding.load(std::sync::atomic::Ordering::Relaxed);
            Ok(if n >= 4 {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{n} holding"))
            })
        },
    )
    .unwrap();
    let mut app = g.app();
    let reply = send(&mut app, hello(Some(SECRET)));
    assert!(
        !matches!(reply, HostMessage::Refused { .. }),
        "the app was locked out: {reply:?}"
    );
    assert!(g.status().app.connected);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in squatters {
        s.join().unwrap();
    }
    drop(app);

    let pid = g.backend.pid().unwrap();
    let before = balloon_lab::host::proc_memory(pid).unwrap().rss_anon;
    let line = format!(
        "{{\"version\":1,\"type\":\"hello\",\"pid\":1,\"secret\":\"{}\"}}\n",
        "a".repeat(1 << 20)
    );
    let peers: Vec<_> = (0..4)
        .map(|_| {
            let mut c = UnixStream::connect(&socket).unwrap();
            let _ = c.write_all(line.as_bytes());
            c
        })
        .collect();
    for c in &peers {
        let mut told = String::new();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(c), &mut told);
        assert!(told.contains("line longer than"), "{told:?}");
    }
    let after = balloon_lab::host::proc_memory(pid).unwrap().rss_anon;
    assert!(
        after < before + 8 * MIB,
        "four long lines before a hello took the backend from {} to {} KiB",
        before >> 10,
        after >> 10
    );
}

/// What a guest causes is logged at most once per interval per kind, with the count, and a
/// peer's words reach the log escaped and bounded (before: out-of-RAM pages 26,048 lines in 3 s,
/// an app's malformed lines 31 MiB of log in 3 s, a peer's `\n` a forged log entry).
#[test]
fn a_guest_cannot_flood_the_log_or_forge_entries_in_it() {
    let _t = timed();
    let mut g = Guest::start("log-flood");
    let outside = (g.ram.len() / PAGE) as u32 + 5;
    for _ in 0..300 {
        g.fe.inflate(&g.ram, &[outside]).unwrap();
    }
    assert_eq!(g.status().rejected.pages_outside_ram, 300);

    g.set_app_target(8 * MIB);
    let mut app = g.app();
    send(&mut app, hello(Some(SECRET)));
    let junk = format!("{{\"version\":1,\"type\":\"{}\"}}\n", "j".repeat(60_000));
    for _ in 0..200 {
        app.send(&junk).unwrap();
    }
    // Still served: its next message is answered.
    let reply = send(&mut app, inflated(7, &[]));
    assert!(
        matches!(reply, HostMessage::Ack { .. } | HostMessage::Nack { .. }),
        "{reply:?}"
    );
    // A peer that has not said hello, with an escaped newline for the log.
    let mut peer = g.app();
    let _ = peer.exchange("{\"version\":1,\"type\":\"x\\nFORGED ENTRY\"}\n");

    let log = g.backend.log();
    let lines = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert!(lines("outside guest RAM") <= 2, "{log}");
    assert!(lines("guest app: ") <= 2, "{log}");
    assert!(log.len() < 256 * 1024, "{} bytes of log", log.len());
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a peer forged a log entry: {log}"
    );
}
