use super::*;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

/// Answers every line with "echo: LINE".
struct Echo;

struct EchoSession(Outbox);

impl Session for EchoSession {
    fn line(&mut self, line: &str) -> Flow {
        if line == "bye" {
            return Flow::Close;
        }
        let _ = self.0.send(format!("echo: {line}\n"));
        Flow::Continue
    }
}

impl Service for Echo {
    type Session = EchoSession;
    fn open(&self, outbox: Outbox) -> EchoSession {
        EchoSession(outbox)
    }
    fn refusal(&self, reason: &str) -> String {
        format!("refused: {reason}\n")
    }
}

fn socket_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lines-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn start(name: &str, limits: Limits) -> (PathBuf, Arc<LineServer<Echo>>) {
    let path = socket_dir(name).join("s.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = Arc::new(LineServer::new("test", Arc::new(Echo), limits));
    let s = server.clone();
    std::thread::spawn(move || s.serve(listener));
    (path, server)
}

fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_line(s: &UnixStream) -> String {
    read_line_within(s, Duration::from_secs(5))
}

fn read_line_within(s: &UnixStream, timeout: Duration) -> String {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut line = String::new();
    let _ = BufReader::new(s).read_line(&mut line);
    line
}

#[test]
fn lines_are_answered_and_a_long_one_ends_only_its_connection() {
    let limits = Limits {
        max_line_bytes: 100,
        ..Limits::default()
    };
    let (path, _server) = start("long", limits);
    let mut c = LineClient::connect(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(c.exchange("hi\n").unwrap(), "echo: hi\n");
    // Empty lines are skipped, not answered.
    assert_eq!(c.exchange("\n  \nagain\n").unwrap(), "echo: again\n");
    let mut other = LineClient::connect(&path, Duration::from_secs(5)).unwrap();
    let long = "x".repeat(500) + "\n";
    let reply = c.exchange(&long).unwrap();
    assert!(
        reply.starts_with("refused: line longer than 100 bytes"),
        "{reply}"
    );
    assert!(
        c.exchange("more\n").is_err(),
        "the connection must have ended"
    );
    assert_eq!(other.exchange("still\n").unwrap(), "echo: still\n");
}

/// Connects to a server with the line deadline `idle`, writes `drip` every 100 ms until the
/// server has closed the connection (failing after `bound`), and returns the connection and how
/// long it lasted.
fn drip_until_closed(
    name: &str,
    idle: Duration,
    drip: &[u8],
    bound: Duration,
) -> (UnixStream, Duration) {
    let limits = Limits {
        idle_timeout: idle,
        ..Limits::default()
    };
    let (path, server) = start(name, limits);
    let mut s = UnixStream::connect(&path).unwrap();
    wait_until("the connection", Duration::from_secs(5), || {
        server.connections() == 1
    });
    let started = Instant::now();
    while server.connections() == 1 {
        assert!(
            started.elapsed() < bound,
            "{drip:?} now and then kept a connection"
        );
        if s.write_all(drip).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (s, started.elapsed())
}

#[test]
fn a_peer_that_drips_bytes_is_closed_at_the_line_deadline() {
    // A byte every 100 ms never completes a line.
    let (s, lasted) = drip_until_closed(
        "drip",
        Duration::from_millis(400),
        b"x",
        Duration::from_secs(5),
    );
    assert!(lasted >= Duration::from_millis(350), "{lasted:?}");
    let line = read_line(&s);
    assert!(line.contains("no complete request"), "{line:?}");
}

#[test]
fn at_the_cap_a_silent_or_idle_connection_makes_room() {
    let limits = Limits {
        max_connections: 3,
        evict_silent_after: Duration::from_millis(200),
        evict_idle_after: Duration::from_millis(600),
        ..Limits::default()
    };
    let (path, server) = start("cap", limits);
    let mut talker = LineClient::connect(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(talker.exchange("hello\n").unwrap(), "echo: hello\n");
    let silent: Vec<UnixStream> = (0..2)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    wait_until("3 connections", Duration::from_secs(5), || {
        server.connections() == 3
    });
    // None silent or idle long enough yet: a fourth is refused with a reason.
    let refused = UnixStream::connect(&path).unwrap();
    let line = read_line(&refused);
    assert!(
        line.starts_with("refused: too many connections"),
        "{line:?}"
    );
    // After the silent grace time, the silent ones make room, the talker (idle less than
    // its own grace time) stays.
    std::thread::sleep(Duration::from_millis(250));
    for _ in 0..2 {
        let mut c = LineClient::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(c.exchange("in\n").unwrap(), "echo: in\n");
        std::mem::forget(c);
    }
    for s in &silent {
        let told = read_line_within(s, Duration::from_secs(2));
        assert!(told.contains("make room"), "{told:?}");
    }
    assert_eq!(talker.exchange("still\n").unwrap(), "echo: still\n");
    assert!(server.connections() <= 3);
}

#[test]
fn a_peer_that_never_reads_is_dropped_and_nobody_waits_for_it() {
    let (path, _server) = start("noread", Limits::default());
    let (tx, rx) = std::sync::mpsc::channel();
    struct Grab(std::sync::mpsc::Sender<Outbox>);
    // The session hands its outbox to the test, as the app channel hands it to the device.
    struct GrabSession;
    impl Session for GrabSession {
        fn line(&mut self, _: &str) -> Flow {
            Flow::Continue
        }
    }
    impl Service for Grab {
        type Session = GrabSession;
        fn open(&self, outbox: Outbox) -> GrabSession {
            let _ = self.0.send(outbox);
            GrabSession
        }
        fn refusal(&self, reason: &str) -> String {
            format!("{reason}\n")
        }
    }
    drop(path);
    let dir = socket_dir("grab");
    let p = dir.join("g.sock");
    let listener = UnixListener::bind(&p).unwrap();
    let server = Arc::new(LineServer::new(
        "grab",
        Arc::new(Grab(tx)),
        Limits {
            write_timeout: Duration::from_millis(300),
            outbox_lines: 8,
            ..Limits::default()
        },
    ));
    let s = server.clone();
    std::thread::spawn(move || s.serve(listener));
    let _peer = UnixStream::connect(&p).unwrap();
    let outbox = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let line = "t".repeat(4095) + "\n";
    let started = Instant::now();
    let mut result = Ok(());
    // Far more than the socket buffer holds: every send returns at once, and the peer is
    // dropped.
    for _ in 0..10_000 {
        let t = Instant::now();
        result = outbox.send(line.clone());
        assert!(t.elapsed() < Duration::from_millis(50), "send blocked");
        if result.is_err() {
            break;
        }
    }
    assert!(result.is_err(), "a peer that never reads was kept");
    assert!(started.elapsed() < Duration::from_secs(5));
    wait_until("the connection to end", Duration::from_secs(5), || {
        server.connections() == 0
    });
}

#[test]
fn the_client_gives_up_at_its_deadline() {
    let dir = socket_dir("client");
    let p = dir.join("mute.sock");
    let listener = UnixListener::bind(&p).unwrap();
    let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let mut c = LineClient::connect(&p, Duration::from_millis(300)).unwrap();
    let t = Instant::now();
    let e = c.exchange("status\n").unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(t.elapsed() < Duration::from_secs(2));
    drop(held);
}

#[test]
fn the_rate_limited_log_counts_what_it_suppressed() {
    let mut log = RateLimitedLog::new(Duration::from_secs(3600));
    let mut built = 0;
    for _ in 0..1000 {
        log.warn(|| {
            built += 1;
            "x".into()
        });
    }
    assert_eq!(built, 1);
    assert_eq!(log.suppressed, 999);
}

#[test]
fn versioned_lines_are_checked_in_order() {
    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
    enum Request {
        Ping { n: u32 },
        Stop {},
    }
    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Message {
        #[allow(dead_code)]
        version: u32,
        #[serde(flatten)]
        request: Request,
    }
    let framing = Framing {
        version_key: "version",
        tag_key: "cmd",
        version: 3,
    };
    let decode = |line: &str| decode_versioned::<Message>(line, framing).map(|m| m.request);
    assert_eq!(
        decode(r#"{"version":3,"cmd":"ping","n":7}"#),
        Ok(Request::Ping { n: 7 })
    );
    assert_eq!(
        decode(r#"{"version":3,"cmd":"stop"}"#),
        Ok(Request::Stop {})
    );
    assert!(matches!(decode("{"), Err(DecodeError::NotJson(_))));
    assert_eq!(
        decode(r#"{"cmd":"stop"}"#),
        Err(DecodeError::MissingVersion("version"))
    );
    // Another version is told so, whatever else is wrong with the line.
    assert_eq!(
        decode(r#"{"version":4,"cmd":"launch"}"#),
        Err(DecodeError::Version(4))
    );
    // serde alone would read variant index 1 as `stop`.
    assert_eq!(
        decode(r#"{"version":3,"cmd":1}"#),
        Err(DecodeError::TagNotString("cmd"))
    );
    assert!(matches!(
        decode(r#"{"version":3,"cmd":"stop","n":1}"#),
        Err(DecodeError::Bad(_))
    ));
}

/// Blank lines are no lines: a peer that sends only newlines is closed at the line deadline,
/// and at the cap it makes room as one that has said nothing (before, each blank line reset the
/// deadline and marked the peer as talking, which no eviction touched).
#[test]
fn blank_lines_neither_keep_a_connection_nor_protect_it_from_eviction() {
    let (s, _) = drip_until_closed(
        "blank-idle",
        Duration::from_millis(600),
        b"\n",
        Duration::from_secs(10),
    );
    assert!(read_line(&s).contains("no complete request"));

    let limits = Limits {
        max_connections: 2,
        evict_idle_after: Duration::MAX,
        ..Limits::default()
    };
    let (path, server) = start("blank-cap", limits);
    let blanks: Vec<UnixStream> = (0..2)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    wait_until("2 connections", Duration::from_secs(5), || {
        server.connections() == 2
    });
    for mut b in &blanks {
        b.write_all(b"\n\n").unwrap();
    }
    let mut c = LineClient::connect(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(c.exchange("in\n").unwrap(), "echo: in\n");
}

/// A session that has shown nobody who it is until it says "hello".
struct Gate;

struct GateSession {
    outbox: Outbox,
    hello: bool,
}

impl Session for GateSession {
    fn line(&mut self, line: &str) -> Flow {
        self.hello |= line == "hello";
        let _ = self.outbox.send(format!("echo: {}\n", line.len()));
        Flow::Continue
    }
    fn authenticated(&self) -> bool {
        self.hello
    }
    fn max_line_bytes(&self) -> Option<usize> {
        (!self.hello).then_some(64)
    }
}

impl Service for Gate {
    type Session = GateSession;
    fn open(&self, outbox: Outbox) -> GateSession {
        GateSession {
            outbox,
            hello: false,
        }
    }
    fn refusal(&self, reason: &str) -> String {
        format!("refused: {reason}\n")
    }
}

/// Until it has said who it is, a peer has `hello_within` and short lines, whatever else it
/// does; then the server's own limits apply.
#[test]
fn a_peer_that_has_not_said_who_it_is_has_hello_within_and_short_lines() {
    let path = socket_dir("gate").join("s.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let limits = Limits {
        hello_within: Duration::from_millis(500),
        ..Limits::default()
    };
    let server = Arc::new(LineServer::new("gate", Arc::new(Gate), limits));
    let s = server.clone();
    std::thread::spawn(move || s.serve(listener));

    // Lines that are not a hello do not buy time.
    let mut talker = UnixStream::connect(&path).unwrap();
    talker
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut replies = BufReader::new(talker.try_clone().unwrap());
    let started = Instant::now();
    let told = loop {
        // Written until the server has closed; its last line says why.
        let _ = talker.write_all(b"not a hello\n");
        let mut reply = String::new();
        replies.read_line(&mut reply).unwrap();
        if reply.starts_with("refused") {
            break reply;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{reply}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(told.contains("no hello"), "{told}");
    assert!(started.elapsed() >= Duration::from_millis(450));

    // A long line before the hello is refused as it is read.
    let mut long = LineClient::connect(&path, Duration::from_secs(5)).unwrap();
    let reply = long.exchange(&("x".repeat(1000) + "\n")).unwrap();
    assert!(reply.contains("line longer than 64 bytes"), "{reply}");

    // After the hello: long lines, and no deadline.
    let mut app = LineClient::connect(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(app.exchange("hello\n").unwrap(), "echo: 5\n");
    std::thread::sleep(Duration::from_millis(700));
    let reply = app.exchange(&("y".repeat(1000) + "\n")).unwrap();
    assert_eq!(reply, "echo: 1000\n");
}

#[test]
fn a_peers_words_are_logged_escaped_and_bounded() {
    assert_eq!(printable("a\nFORGED\u{1b}[31m"), "a\\nFORGED\\u{1b}[31m");
    let long = printable(&"x".repeat(10_000));
    assert_eq!(long.len(), MAX_LOGGED_CHARS + 3);
}
