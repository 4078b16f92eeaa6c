use super::*;
use crate::api::SchedulerStatus;
use crate::metrics::render;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends raw bytes (then closes its sending side if `half_close`), reads until the server
/// closes; None if it closed without an answer.
fn exchange(addr: SocketAddr, request: &[u8], half_close: bool) -> Option<Response> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    if half_close {
        s.shutdown(Shutdown::Write).unwrap();
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    if raw.is_empty() {
        return None;
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line {status_line:?}"));
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(": ").expect(l);
            (n.to_string(), v.to_string())
        })
        .collect();
    Some(Response {
        status,
        headers,
        body,
    })
}

/// Sends a request and closes the sending side, as `printf ... | nc` does.
fn get(addr: SocketAddr, request: &[u8]) -> Response {
    exchange(addr, request, true).expect("no answer")
}

fn server() -> (SocketAddr, String) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Any exposition will do: these tests are about HTTP.
    let st = SchedulerStatus::default();
    let expected = render(&st);
    std::thread::spawn(move || serve(listener, Arc::new(move || render(&st))));
    (addr, expected)
}

const GOOD: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n";

fn assert_serves_metrics(addr: SocketAddr, expected: &str) {
    // As Prometheus does: the connection stays open both ways until the answer is read.
    let ok = exchange(addr, GOOD, false).expect("no answer");
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("Content-Type"), Some(CONTENT_TYPE));
    assert_eq!(
        ok.header("Content-Length"),
        Some(ok.body.len().to_string().as_str())
    );
    assert_eq!(String::from_utf8(ok.body).unwrap(), expected);
}

#[test]
fn serves_metrics_and_404_elsewhere() {
    let (addr, expected) = server();
    assert_serves_metrics(addr, &expected);
    assert_eq!(get(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").status, 200);
    let head = get(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("Content-Length"),
        Some(expected.len().to_string().as_str())
    );
    let other = get(addr, b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(other.status, 404);
    assert!(!String::from_utf8(other.body).unwrap().contains("balloon"));
    assert_eq!(get(addr, b"GET / HTTP/1.1\r\n\r\n").status, 404);
    let post = get(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(post.status, 405);
    assert_eq!(post.header("Allow"), Some("GET, HEAD"));
    // A client that half-closes after its request line still gets an answer.
    assert_eq!(get(addr, b"GET /metrics HTTP/1.0\r\n").status, 200);
}

#[test]
fn survives_garbage_and_answers_the_next_request() {
    let (addr, expected) = server();
    let bad: &[&[u8]] = &[
        b"\x00\x01garbage\r\n\r\n",
        b"\xff\xfe\xfd\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: \xff\r\nbroken header\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET  /metrics HTTP/1.1\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"get /metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n: no name\r\n\r\n",
        b"GET /met",
    ];
    for request in bad {
        let r = get(addr, request);
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(request));
        assert_serves_metrics(addr, &expected);
    }
    // Too much header: refused, and the server goes on.
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    while huge.len() <= MAX_REQUEST_HEAD as usize {
        huge.extend_from_slice(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
    }
    huge.extend_from_slice(b"\r\n");
    assert_eq!(get(addr, &huge).status, 431);
    let long_line = [b"GET /".as_slice(), &[b'a'; 20_000], b" HTTP/1.1\r\n\r\n"].concat();
    assert_eq!(get(addr, &long_line).status, 431);
    // Connecting and closing without a word gets no answer.
    assert!(exchange(addr, b"", true).is_none());
    // Pseudo-random bytes: any answer, never a dead server.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for round in 0..50 {
        let len = 1 + round * 7;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&bytes).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    assert_serves_metrics(addr, &expected);
}

#[test]
fn slow_drip_clients_cannot_starve_scrapes() {
    let (addr, expected) = server();
    // More slow clients than connection slots, each sending a byte of a request that never
    // ends every 400 ms: well inside a per-read timeout, so only a deadline per request
    // frees their slots.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let drips: Vec<_> = (0..MAX_CONNECTIONS + 6)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let request =
                    b"GET /metrics HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
                for byte in request.iter().cycle() {
                    if stop.load(Ordering::SeqCst) || s.write_all(&[*byte]).is_err() {
                        return;
                    }
                    let until = Instant::now() + Duration::from_millis(400);
                    while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                        std::thread::park_timeout(until - Instant::now());
                    }
                }
            })
        })
        .collect();
    let scrape = || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(GOOD).unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        String::from_utf8_lossy(&raw).into_owned()
    };
    // The slots are taken: a scrape is refused now (the condition this test is about), with
    // a 503 or, as the server does not read the request it refuses, a reset.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let text = scrape();
        if !text.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow clients never held the slots: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Their deadline passes: the slots free up while they still drip, and a scrape is
    // answered within a bounded time after it.
    let bound = started + IO_TIMEOUT + Duration::from_secs(3);
    let answered = loop {
        let text = scrape();
        if text.starts_with("HTTP/1.1 200 OK\r\n") {
            break text;
        }
        assert!(
            Instant::now() < bound,
            "no scrape answered {:?} after the slow clients connected: {text:?}",
            bound - started
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(answered.ends_with(&expected));
    assert!(started.elapsed() >= IO_TIMEOUT - Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    for d in drips {
        d.thread().unpark();
        d.join().unwrap();
    }
}

#[test]
fn an_idle_client_does_not_hold_up_others() {
    let (addr, expected) = server();
    // Connected, silent, kept open while another client is answered.
    let idle = TcpStream::connect(addr).unwrap();
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost:").unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    // Well under IO_TIMEOUT: a server answering one connection at a time would still be
    // waiting for the first one.
    s.set_read_timeout(Some(IO_TIMEOUT / 2)).unwrap();
    s.write_all(GOOD).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with(&expected));
    drop((idle, half));
}

/// Another local user holding connections (24 that each send a byte and reconnect as soon as
/// they are closed, as in the trust review, where 0 of 20 scrapes were answered) gets at most
/// its own share of the slots: every scrape is answered.
#[test]
fn another_local_user_cannot_starve_scrapes() {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        eprintln!("skipped: needs root to connect as another user (nobody)");
        return;
    }
    let (addr, expected) = server();
    let script = r#"
import socket, sys, threading, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
end = time.time() + seconds
held = [0]
def squat():
    while time.time() < end:
        try:
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"G")
            held[0] += 1
            s.settimeout(max(0.1, end - time.time()))
            while s.recv(4096):
                pass
        except OSError:
            pass
        finally:
            try:
                s.close()
            except Exception:
                pass
for _ in range(24):
    threading.Thread(target=squat, daemon=True).start()
time.sleep(0.5)
print("squatting", flush=True)
time.sleep(max(0, end - time.time()))
"#;
    let mut squatter = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(addr.port().to_string())
        .arg("30")
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 as nobody");
    let mut ready = String::new();
    BufReader::new(squatter.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "squatting");
    let answered = (0..20)
        .filter(|_| {
            exchange(addr, GOOD, false)
                .is_some_and(|r| r.status == 200 && String::from_utf8_lossy(&r.body) == expected)
        })
        .count();
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert_eq!(
        answered, 20,
        "scrapes answered beside another user's squatting"
    );
}
