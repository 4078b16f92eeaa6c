//! Prometheus metrics (text exposition format 0.0.4) over a tiny HTTP server; off unless
//! `metrics_listen` is set.

use crate::api::SchedulerStatus;
use crate::trace::TraceGuest;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A label value as the exposition format writes it: `\`, `"` and line feeds escaped.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn guest_label(name: &str) -> String {
    format!("{{guest=\"{}\"}}", escape_label(name))
}

/// One metric family: `# HELP`, `# TYPE` and its samples (label set, value). Families without
/// samples are left out.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// The status as metrics. Host and guest gauges come from the latest tick and are absent before
/// the first one; the counters are always there.
pub fn render(status: &SchedulerStatus) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "balloon_scheduler_ticks_total",
        "counter",
        "Scheduling ticks run since start.",
        &[(String::new(), status.ticks)],
    );
    // Every known guest has an error counter from the start, at 0 until its first error.
    let mut guests: BTreeSet<&str> = status.drivers.keys().map(String::as_str).collect();
    guests.extend(status.driver_errors.keys().map(String::as_str));
    if let Some(last) = &status.last {
        guests.extend(last.guests.iter().map(|g| g.name.as_str()));
    }
    let errors: Vec<(String, u64)> = guests
        .iter()
        .map(|g| {
            let n = status.driver_errors.get(*g).copied().unwrap_or(0);
            (guest_label(g), n)
        })
        .collect();
    family(
        &mut out,
        "balloon_scheduler_driver_errors_total",
        "counter",
        "Driver errors per guest since start.",
        &errors,
    );
    let Some(last) = &status.last else {
        return out;
    };
    for (name, help, value) in [
        (
            "balloon_scheduler_host_total_bytes",
            "Host memory.",
            last.host_total_bytes,
        ),
        (
            "balloon_scheduler_host_available_bytes",
            "Host MemAvailable.",
            last.host_available_bytes,
        ),
        (
            "balloon_scheduler_budget_bytes",
            "Memory the guests may use together.",
            last.budget_bytes,
        ),
        (
            "balloon_scheduler_minimums_bytes",
            "The sum of the guests' minimums.",
            last.minimums_bytes,
        ),
        (
            "balloon_scheduler_budget_infeasible",
            "1 while the budget cannot hold the guests' minimums (every guest is held at its minimum).",
            u64::from(last.budget_infeasible),
        ),
    ] {
        family(&mut out, name, "gauge", help, &[(String::new(), value)]);
    }
    let levels: Vec<(String, u64)> = ["high", "soft", "hard", "low"]
        .iter()
        .map(|l| {
            (
                format!("{{level=\"{l}\"}}"),
                u64::from(last.host_state == *l),
            )
        })
        .collect();
    family(
        &mut out,
        "balloon_scheduler_host_level",
        "gauge",
        "1 for the host's current free-memory level (high, soft, hard, low), 0 for the others.",
        &levels,
    );
    // A guest pinned by an operator may also be stalled or unreachable, which its state shows
    // instead; the pinned set says it either way.
    let pinned = |g: &TraceGuest| status.pinned.contains_key(&g.name) || g.state == "pinned";
    type Field<'a> = Box<dyn Fn(&TraceGuest) -> Option<u64> + 'a>;
    let per_guest: [(&str, &str, Field); 8] = [
        (
            "memory_bytes",
            "Configured guest memory.",
            Box::new(|g| Some(g.memory_bytes)),
        ),
        (
            "allocation_bytes",
            "Memory the guest may use now (its memory minus the balloon's actual size).",
            Box::new(|g| Some(g.allocation_bytes)),
        ),
        (
            "balloon_target_bytes",
            "Balloon size asked for.",
            Box::new(|g| Some(g.balloon_target_bytes)),
        ),
        (
            "balloon_actual_bytes",
            "Balloon size reached.",
            Box::new(|g| Some(g.balloon_actual_bytes)),
        ),
        (
            "available_bytes",
            "The guest's MemAvailable, when it reports statistics.",
            Box::new(|g| g.available_bytes),
        ),
        (
            "pinned",
            "1 if an operator pinned the guest.",
            Box::new(|g| Some(u64::from(pinned(g)))),
        ),
        (
            "stalled",
            "1 if the guest's balloon stalled.",
            Box::new(|g| Some(u64::from(g.state == "stalled"))),
        ),
        (
            "reachable",
            "1 if the guest's driver answered.",
            Box::new(|g| Some(u64::from(g.state != "unreachable"))),
        ),
    ];
    for (suffix, help, field) in per_guest {
        let samples: Vec<(String, u64)> = last
            .guests
            .iter()
            .filter_map(|g| field(g).map(|v| (guest_label(&g.name), v)))
            .collect();
        family(
            &mut out,
            &format!("balloon_scheduler_guest_{suffix}"),
            "gauge",
            help,
            &samples,
        );
    }
    out
}

/// The most a request line and its headers may take together.
const MAX_REQUEST_HEAD: u64 = 16 * 1024;
/// Connections answered at once; more are refused with 503.
const MAX_CONNECTIONS: usize = 16;
/// How long a client may take, in all, to send its request and take the answer: one deadline
/// per request, not per read, so that a client sending a byte now and then cannot hold a
/// connection slot for longer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// After answering, what is left of the request is read and dropped (so that closing does not
/// reset the connection under the answer), up to this much and this long in all.
const MAX_DRAIN: u64 = 64 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection whose reads and writes must all be done by one deadline: before each, the
/// socket's timeout is set to the time left.
struct Deadlined {
    stream: TcpStream,
    deadline: Instant,
}

impl Deadlined {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request's deadline passed",
            ))
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

#[derive(Debug, PartialEq)]
enum Head {
    Request {
        method: String,
        target: String,
    },
    /// The peer closed before sending anything.
    Closed,
    Malformed,
    TooLarge,
}

fn parse_request_line(line: &[u8]) -> Option<(String, String)> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let method_ok = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    let target_ok = target.starts_with('/') && target.bytes().all(|b| b.is_ascii_graphic());
    let version_ok = version == "HTTP/1.1" || version == "HTTP/1.0";
    (parts.next().is_none() && method_ok && target_ok && version_ok)
        .then(|| (method.to_string(), target.to_string()))
}

/// Reads the request line and the headers (which it checks for form and drops).
fn read_head(reader: &mut impl BufRead) -> std::io::Result<Head> {
    let mut limited = reader.take(MAX_REQUEST_HEAD);
    let mut line = Vec::new();
    let mut request = None;
    loop {
        line.clear();
        let n = limited.read_until(b'\n', &mut line)?;
        if n == 0 {
            // The peer stopped sending (or the size limit was reached).
            return Ok(match request {
                _ if limited.limit() == 0 => Head::TooLarge,
                None => Head::Closed,
                // A request without the blank line that ends its headers, from a client that
                // half-closed its side: answer it anyway.
                Some((method, target)) => Head::Request { method, target },
            });
        }
        if line.last() != Some(&b'\n') {
            if limited.limit() == 0 {
                return Ok(Head::TooLarge);
            }
            // The peer closed in the middle of a line.
            return Ok(Head::Malformed);
        }
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        match &request {
            None => match parse_request_line(&line) {
                Some(r) => request = Some(r),
                None => return Ok(Head::Malformed),
            },
            Some(_) if line.is_empty() => break,
            Some(_) => {
                // A header is `name: value`, the name a non-empty token.
                let colon = line.iter().position(|&b| b == b':');
                let name_ok = colon.is_some_and(|c| {
                    c > 0 && line[..c].iter().all(|b| b.is_ascii_graphic() && *b != b':')
                });
                if !name_ok {
                    return Ok(Head::Malformed);
                }
            }
        }
    }
    let (method, target) = request.expect("the loop only ends after the request line");
    Ok(Head::Request { method, target })
}

fn respond(
    writer: &mut impl Write,
    status: &str,
    extra_headers: &str,
    body: &str,
    send_body: bool,
) -> std::io::Result<()> {
    let content_type = if status.starts_with("200") {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        body.len()
    );
    if send_body {
        response.push_str(body);
    }
    writer.write_all(response.as_bytes())?;
    writer.flush()
}

fn answer(stream: TcpStream, render: &(dyn Fn() -> String + Send + Sync)) -> std::io::Result<()> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut writer = Deadlined {
        stream: stream.try_clone()?,
        deadline,
    };
    let mut reader = BufReader::new(Deadlined { stream, deadline });
    match read_head(&mut reader)? {
        Head::Closed => return Ok(()),
        Head::Malformed => respond(&mut writer, "400 Bad Request", "", "bad request\n", true)?,
        Head::TooLarge => respond(
            &mut writer,
            "431 Request Header Fields Too Large",
            "",
            "request header too large\n",
            true,
        )?,
        Head::Request { method, target } => {
            let path = target.split('?').next().unwrap_or_default();
            match (method.as_str(), path) {
                ("GET" | "HEAD", "/metrics") => {
                    respond(&mut writer, "200 OK", "", &render(), method == "GET")?
                }
                (_, "/metrics") => respond(
                    &mut writer,
                    "405 Method Not Allowed",
                    "Allow: GET, HEAD\r\n",
                    "method not allowed\n",
                    method != "HEAD",
                )?,
                _ => respond(
                    &mut writer,
                    "404 Not Found",
                    "",
                    "not found\n",
                    method != "HEAD",
                )?,
            }
        }
    }
    // Lingering close: the answer is sent; read what else the client sent until it closes.
    writer.stream.shutdown(Shutdown::Write)?;
    reader.get_mut().deadline = Instant::now() + DRAIN_TIMEOUT;
    std::io::copy(&mut reader.take(MAX_DRAIN), &mut std::io::sink())?;
    Ok(())
}

/// Decrements the count of connections being answered when the thread answering one ends
/// (also if it panics, or if it could not be started).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves GET /metrics until the listener fails, one thread per connection (at most
/// `MAX_CONNECTIONS` at once), so that a slow client does not hold up the others.
pub fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let mut stream = match conn {
            Ok(stream) => stream,
            Err(e) => {
                log::warn!("metrics: accept: {e}");
                // Out of file descriptors and similar: do not spin on the error.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            // Best effort, without waiting for the client.
            let _ = stream.set_nonblocking(true);
            let _ = stream.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            continue;
        }
        let slot = Slot(active.clone());
        let render = render.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-conn".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = answer(stream, &*render) {
                    log::debug!("metrics: {e}");
                }
            });
        if let Err(e) = spawned {
            log::warn!("metrics: starting a connection thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::TraceRecord;
    use std::collections::{BTreeMap, HashSet};
    use std::net::SocketAddr;

    const WEIRD: &str = "we\"ird\\na\nme";

    fn guest(name: &str, state: &str, available: Option<u64>) -> TraceGuest {
        TraceGuest {
            name: name.into(),
            memory_bytes: 1 << 30,
            allocation_bytes: 3 << 28,
            used_bytes: available.map(|a| (3 << 28) - a),
            available_bytes: available,
            balloon_target_bytes: 1 << 28,
            balloon_actual_bytes: (1 << 28) + 4096,
            decided_allocation_bytes: 3 << 28,
            sent_balloon_bytes: None,
            state: state.into(),
        }
    }

    fn status() -> SchedulerStatus {
        SchedulerStatus {
            ticks: 3,
            uptime_s: 6.5,
            last: Some(TraceRecord {
                time_s: 6.0,
                policy: "shares".into(),
                host_state: "soft".into(),
                // Above 2^53: must not lose precision.
                host_total_bytes: (1 << 60) + 1,
                host_available_bytes: 1 << 30,
                budget_bytes: 4 << 30,
                minimums_bytes: 3 << 30,
                budget_infeasible: false,
                guests: vec![
                    guest("a", "ok", Some(1 << 27)),
                    guest(WEIRD, "stalled", None),
                    guest("c", "unreachable", Some(5 << 20)),
                ],
            }),
            drivers: ["a", WEIRD, "c", "d"]
                .iter()
                .map(|g| (g.to_string(), "backend".to_string()))
                .collect(),
            pinned: BTreeMap::from([("c".to_string(), 1 << 29)]),
            driver_errors: BTreeMap::from([("c".to_string(), 7)]),
        }
    }

    fn is_name(s: &str, colon: bool) -> bool {
        let mut chars = s.chars();
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':');
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && chars.all(ok)
    }

    /// Parses `{name="value",...}` with the format's escapes; None if malformed.
    fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
        let mut rest = s.strip_prefix('{')?;
        let mut labels = Vec::new();
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                return r.is_empty().then_some(labels);
            }
            let eq = rest.find('=')?;
            let name = &rest[..eq];
            if !is_name(name, false) {
                return None;
            }
            let mut chars = rest[eq + 1..].strip_prefix('"')?.char_indices();
            let mut value = String::new();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => value.push(match chars.next()?.1 {
                        '\\' => '\\',
                        '"' => '"',
                        'n' => '\n',
                        _ => return None,
                    }),
                    (_, '\n') => return None,
                    (_, c) => value.push(c),
                }
            };
            labels.push((name.to_string(), value));
            rest = &rest[eq + 1 + 1 + end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }

    /// A sample: metric name, labels, value.
    type Sample = (String, Vec<(String, String)>, f64);

    /// Checks the whole text against the exposition format and returns its samples.
    fn parse(text: &str) -> Vec<Sample> {
        assert!(text.ends_with('\n'), "no final line feed");
        let mut samples = Vec::new();
        let mut typed: BTreeMap<String, String> = BTreeMap::new();
        let mut helped = HashSet::new();
        let mut current: Option<String> = None;
        let mut series = HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let (kw, rest) = rest.split_once(' ').expect(line);
                let (name, arg) = rest.split_once(' ').expect(line);
                assert!(is_name(name, true), "{line}");
                match kw {
                    "HELP" => {
                        assert!(helped.insert(name.to_string()), "second HELP: {line}");
                        assert!(!arg.is_empty());
                    }
                    "TYPE" => {
                        assert!(["counter", "gauge"].contains(&arg), "{line}");
                        let old = typed.insert(name.to_string(), arg.to_string());
                        assert!(old.is_none(), "second TYPE: {line}");
                        current = Some(name.to_string());
                    }
                    _ => panic!("unknown comment {line}"),
                }
                continue;
            }
            let (name_labels, value) = line.rsplit_once(' ').expect(line);
            let value: f64 = value.parse().expect(line);
            let (name, labels) = match name_labels.find('{') {
                Some(i) => (
                    &name_labels[..i],
                    parse_labels(&name_labels[i..]).unwrap_or_else(|| panic!("labels: {line}")),
                ),
                None => (name_labels, Vec::new()),
            };
            assert!(is_name(name, true), "{line}");
            assert_eq!(
                current.as_deref(),
                Some(name),
                "sample outside its family: {line}"
            );
            assert!(helped.contains(name), "no HELP: {line}");
            if typed[name] == "counter" {
                assert!(name.ends_with("_total"), "{line}");
            }
            assert!(series.insert(name_labels.to_string()), "repeated: {line}");
            samples.push((name.to_string(), labels, value));
        }
        samples
    }

    fn value(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> Option<f64> {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && match label {
                        Some((k, v)) => l.len() == 1 && l[0].0 == k && l[0].1 == v,
                        None => l.is_empty(),
                    }
            })
            .map(|s| s.2)
    }

    #[test]
    fn every_line_follows_the_exposition_format() {
        let text = render(&status());
        let samples = parse(&text);
        // ticks; errors for a, WEIRD, c, d; 5 host and budget gauges; 4 levels; 7 gauges for each
        // of 3 guests and available for the 2 with statistics.
        assert_eq!(samples.len(), 1 + 4 + 5 + 4 + 3 * 7 + 2, "{text}");
        for (name, _, _) in &samples {
            assert!(name.starts_with("balloon_scheduler_"), "{name}");
        }
        // Integers are written as integers, even above 2^53.
        assert!(text.contains("\nballoon_scheduler_host_total_bytes 1152921504606846977\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        let text = render(&status());
        assert!(
            text.contains("balloon_scheduler_guest_stalled{guest=\"we\\\"ird\\\\na\\nme\"} 1\n"),
            "{text}"
        );
        // Escaped, the name stays on one line and reads back as itself.
        let samples = parse(&text);
        let weird: Vec<_> = samples
            .iter()
            .filter(|(_, l, _)| l.iter().any(|(_, v)| v == WEIRD))
            .collect();
        assert_eq!(weird.len(), 8, "{text}");
    }

    #[test]
    fn values_follow_the_status() {
        let samples = parse(&render(&status()));
        let v = |name: &str, label: Option<(&str, &str)>| {
            value(&samples, &format!("balloon_scheduler_{name}"), label)
        };
        let g = |name| Some(("guest", name));
        assert_eq!(v("ticks_total", None), Some(3.0));
        assert_eq!(v("budget_bytes", None), Some((4u64 << 30) as f64));
        assert_eq!(v("minimums_bytes", None), Some((3u64 << 30) as f64));
        assert_eq!(v("budget_infeasible", None), Some(0.0));
        assert_eq!(v("host_available_bytes", None), Some((1u64 << 30) as f64));
        for (level, on) in [("high", 0.0), ("soft", 1.0), ("hard", 0.0), ("low", 0.0)] {
            assert_eq!(v("host_level", Some(("level", level))), Some(on), "{level}");
        }
        assert_eq!(v("guest_memory_bytes", g("a")), Some((1u64 << 30) as f64));
        assert_eq!(
            v("guest_allocation_bytes", g("a")),
            Some((3u64 << 28) as f64)
        );
        assert_eq!(
            v("guest_balloon_target_bytes", g("a")),
            Some((1u64 << 28) as f64)
        );
        assert_eq!(
            v("guest_balloon_actual_bytes", g("a")),
            Some(((1u64 << 28) + 4096) as f64)
        );
        assert_eq!(
            v("guest_available_bytes", g("a")),
            Some((1u64 << 27) as f64)
        );
        assert_eq!(v("guest_available_bytes", g(WEIRD)), None);
        // a: ok; WEIRD: stalled; c: pinned by the operator but unreachable.
        assert_eq!(v("guest_stalled", g("a")), Some(0.0));
        assert_eq!(v("guest_stalled", g(WEIRD)), Some(1.0));
        assert_eq!(v("guest_pinned", g("a")), Some(0.0));
        assert_eq!(v("guest_pinned", g("c")), Some(1.0));
        assert_eq!(v("guest_reachable", g("a")), Some(1.0));
        assert_eq!(v("guest_reachable", g(WEIRD)), Some(1.0));
        assert_eq!(v("guest_reachable", g("c")), Some(0.0));
        // Every known guest has an error counter, also d (no tick data yet) and those without
        // errors.
        assert_eq!(v("driver_errors_total", g("c")), Some(7.0));
        assert_eq!(v("driver_errors_total", g("a")), Some(0.0));
        assert_eq!(v("driver_errors_total", g("d")), Some(0.0));
        assert_eq!(v("guest_memory_bytes", g("d")), None);
    }

    #[test]
    fn an_infeasible_budget_shows_as_a_gauge() {
        let mut st = status();
        if let Some(last) = st.last.as_mut() {
            last.budget_infeasible = true;
            last.minimums_bytes = 5 << 30;
        }
        let text = render(&st);
        assert!(
            text.contains("\nballoon_scheduler_budget_infeasible 1\n"),
            "{text}"
        );
        let samples = parse(&text);
        assert_eq!(
            value(&samples, "balloon_scheduler_minimums_bytes", None),
            Some((5u64 << 30) as f64)
        );
    }

    #[test]
    fn before_the_first_tick_only_counters() {
        let mut st = status();
        st.last = None;
        let text = render(&st);
        let names: BTreeSet<String> = parse(&text).into_iter().map(|s| s.0).collect();
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            [
                "balloon_scheduler_driver_errors_total",
                "balloon_scheduler_ticks_total"
            ]
        );
        let empty = render(&SchedulerStatus::default());
        assert_eq!(parse(&empty).len(), 1, "{empty}");
    }

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
        let st = status();
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
}
