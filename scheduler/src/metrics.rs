//! Prometheus metrics (text exposition format 0.0.4) over a tiny HTTP server; off unless
//! `metrics_listen` is set.

use crate::api::SchedulerStatus;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The status as metrics.
pub fn render(status: &SchedulerStatus) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    family(
        "balloon_scheduler_ticks_total",
        "counter",
        "Scheduling ticks run since start.",
        vec![(String::new(), status.ticks as f64)],
    );
    family(
        "balloon_scheduler_driver_errors_total",
        "counter",
        "Driver errors per guest since start.",
        status
            .driver_errors
            .iter()
            .map(|(g, n)| (format!("{{guest=\"{}\"}}", escape(g)), *n as f64))
            .collect(),
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
    ] {
        family(name, "gauge", help, vec![(String::new(), value as f64)]);
    }
    family(
        "balloon_scheduler_host_level",
        "gauge",
        "1 for the host's current free-memory level.",
        ["high", "soft", "hard", "low"]
            .iter()
            .map(|l| {
                (
                    format!("{{level=\"{l}\"}}"),
                    f64::from(u8::from(last.host_state == *l)),
                )
            })
            .collect(),
    );
    type Field = fn(&crate::trace::TraceGuest) -> Option<f64>;
    let per_guest: [(&str, &str, Field); 8] = [
        ("memory_bytes", "Configured guest memory.", |g| {
            Some(g.memory_bytes as f64)
        }),
        ("allocation_bytes", "Memory the guest may use now.", |g| {
            Some(g.allocation_bytes as f64)
        }),
        ("balloon_target_bytes", "Balloon size asked for.", |g| {
            Some(g.balloon_target_bytes as f64)
        }),
        ("balloon_actual_bytes", "Balloon size reached.", |g| {
            Some(g.balloon_actual_bytes as f64)
        }),
        ("available_bytes", "The guest's MemAvailable.", |g| {
            g.available_bytes.map(|v| v as f64)
        }),
        ("pinned", "1 if an operator pinned the guest.", |g| {
            Some(f64::from(u8::from(g.state == "pinned")))
        }),
        ("stalled", "1 if the balloon stalled.", |g| {
            Some(f64::from(u8::from(g.state == "stalled")))
        }),
        ("reachable", "1 if the guest's driver answered.", |g| {
            Some(f64::from(u8::from(g.state != "unreachable")))
        }),
    ];
    for (suffix, help, field) in per_guest {
        family(
            &format!("balloon_scheduler_guest_{suffix}"),
            "gauge",
            help,
            last.guests
                .iter()
                .filter_map(|g| field(g).map(|v| (format!("{{guest=\"{}\"}}", escape(&g.name)), v)))
                .collect(),
        );
    }
    out
}

const MAX_HEADER_BYTES: u64 = 16 * 1024;

fn answer(stream: TcpStream, render: &(dyn Fn() -> String + Send + Sync)) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream).take(MAX_HEADER_BYTES);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain the headers (up to the blank line or the size limit).
    let mut header = String::new();
    while reader.read_line(&mut header)? > 0 && header.trim_end() != "" {
        header.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (status, body) = match (parts.next(), parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics"), Some(v)) if v.starts_with("HTTP/") => ("200 OK", render()),
        (Some(_), Some(_), Some(v)) if v.starts_with("HTTP/") => {
            ("404 Not Found", "not found\n".into())
        }
        _ => ("400 Bad Request", "bad request\n".into()),
    };
    write!(
        writer,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Serves GET /metrics until the listener fails; one connection at a time.
pub fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                if let Err(e) = answer(stream, &*render) {
                    log::debug!("metrics: {e}");
                }
            }
            Err(e) => log::warn!("metrics: accept: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{TraceGuest, TraceRecord};

    fn status() -> SchedulerStatus {
        let guest = |name: &str, state: &str| TraceGuest {
            name: name.into(),
            memory_bytes: 1 << 30,
            allocation_bytes: 1 << 29,
            used_bytes: Some(1 << 28),
            available_bytes: Some(1 << 27),
            balloon_target_bytes: 1 << 29,
            balloon_actual_bytes: 1 << 29,
            decided_allocation_bytes: 1 << 29,
            sent_balloon_bytes: None,
            state: state.into(),
        };
        SchedulerStatus {
            ticks: 3,
            last: Some(TraceRecord {
                time_s: 6.0,
                policy: "shares".into(),
                host_state: "soft".into(),
                host_total_bytes: 8 << 30,
                host_available_bytes: 1 << 30,
                budget_bytes: 4 << 30,
                guests: vec![guest("a", "ok"), guest("we\"ird\\name", "stalled")],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn every_sample_line_is_well_formed() {
        let text = render(&status());
        let mut samples = 0;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name_labels, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap();
            let name = name_labels.split('{').next().unwrap();
            assert!(name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'));
            assert!(name.starts_with("balloon_scheduler_"));
            samples += 1;
        }
        assert!(samples >= 20, "{text}");
        assert!(text.contains("balloon_scheduler_host_level{level=\"soft\"} 1"));
        assert!(text.contains("guest=\"we\\\"ird\\\\name\""), "{text}");
        assert!(text.contains("balloon_scheduler_guest_stalled{guest=\"a\"} 0"));
    }

    fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_and_survives_garbage() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let st = status();
        std::thread::spawn(move || serve(listener, Arc::new(move || render(&st))));
        assert!(get(addr, "\x00\x01garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("balloon_scheduler_ticks_total 3"));
        assert!(get(addr, "GET /other HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    }
}
