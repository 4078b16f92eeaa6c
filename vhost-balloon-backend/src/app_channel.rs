//! The guest app channel: serves the user-level balloon app (balloon-guest) of this VM. The
//! backend listens on a Unix socket; QEMU's virtio-serial port connects to it
//! (`-chardev socket,path=APP_SOCKET,reconnect-ms=...` + `virtserialport,name=...`), and in
//! tests a plain client does. Page ranges from the app are validated and discarded with the
//! same code as the driver's, and tracked apart.
//!
//! A virtio-serial connection outlives the app (the host side stays connected when the guest
//! process dies), so the app's pages count as given back when a new app says hello, when the
//! connection closes, or when the app has been silent for `SILENCE` (it reports its state every
//! second).

use crate::balloon::Balloon;
use crate::memory::PfnRange;
use crate::vhu_balloon::lock;
use balloon_protocol::app::{decode, encode, AppMessage, HostMessage, PageRange, MAX_LINE_BYTES};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An app silent this long is gone.
pub const SILENCE: Duration = Duration::from_secs(5);

fn ranges(r: &[PageRange]) -> Vec<PfnRange> {
    r.iter()
        .map(|r| PfnRange {
            start: r.start,
            count: r.count,
        })
        .collect()
}

/// Handles one message; returns the reply, if any.
pub fn handle(balloon: &mut Balloon, msg: AppMessage) -> Option<HostMessage> {
    balloon.app.last_heard = Some(Instant::now());
    match msg {
        AppMessage::Hello { pid } => {
            log::info!("guest app (pid {pid}) connected");
            // A new app: whatever an earlier one held, the guest kernel has freed.
            balloon.app_gone();
            balloon.app.connected = true;
            Some(HostMessage::Target {
                bytes: balloon.app.target_bytes,
            })
        }
        AppMessage::Inflated { seq, ranges: r } => match balloon.app_inflated(&ranges(&r)) {
            Ok(()) => Some(HostMessage::Ack { seq }),
            Err(reason) => Some(HostMessage::Nack { seq, reason }),
        },
        AppMessage::Deflate { seq, ranges: r } => {
            balloon.app_deflate(&ranges(&r));
            Some(HostMessage::Ack { seq })
        }
        AppMessage::State {
            held_bytes,
            psi_some_avg10,
            stalled,
            ..
        } => {
            balloon.app.held_bytes = held_bytes;
            balloon.app.psi_some_avg10 = psi_some_avg10;
            balloon.app.stalled = stalled;
            None
        }
    }
}

fn serve_connection(stream: UnixStream, balloon: &Mutex<Balloon>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let writer = stream.try_clone()?;
    lock(balloon).app.writer = Some(writer.try_clone()?);
    lock(balloon).send_app_target();
    let mut writer = writer;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        {
            let mut b = lock(balloon);
            if b.app.connected && b.app.last_heard.is_some_and(|t| t.elapsed() > SILENCE) {
                log::info!("guest app silent for {SILENCE:?}: its pages are the guest's again");
                b.app.connected = false;
                b.app_gone();
            }
        }
        match (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_line(&mut line)
        {
            Ok(0) => return Ok(()),
            Ok(_) if !line.ends_with('\n') && line.len() <= MAX_LINE_BYTES => continue,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(e) => return Err(e),
        }
        let text = std::mem::take(&mut line);
        if text.trim().is_empty() {
            continue;
        }
        let reply = match decode::<AppMessage>(text.trim()) {
            Ok(msg) => handle(&mut lock(balloon), msg),
            Err(e) => {
                log::warn!("guest app: {e}");
                lock(balloon).counters.rejected.bad_descriptors += 1;
                None
            }
        };
        if let Some(r) = reply {
            writer.write_all(encode(r).as_bytes())?;
        }
    }
}

/// Accepts connections one at a time, forever.
pub fn serve(listener: UnixListener, balloon: Arc<Mutex<Balloon>>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                if let Err(e) = serve_connection(stream, &balloon) {
                    log::warn!("app channel: {e}");
                }
                let mut b = lock(&balloon);
                b.app.writer = None;
                if b.app.connected {
                    log::info!("guest app channel closed: its pages are the guest's again");
                    b.app.connected = false;
                    b.app_gone();
                }
            }
            Err(e) => log::warn!("app channel: accept: {e}"),
        }
    }
}
