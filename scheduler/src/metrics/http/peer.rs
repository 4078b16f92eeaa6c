//! Who is on the other end of a loopback TCP connection: the kernel knows the owner of every
//! socket, and its sock_diag netlink interface (what `ss` uses) answers for one socket by its
//! addresses in one exact lookup, however many sockets the host has. /metrics limits connections
//! per user with it, so no local user can hold every slot (a Unix socket would give
//! SO_PEERCRED, but Prometheus scrapes over TCP). Written by hand: the netlink crates that could
//! do it are whole families of packet types for a 72-byte request and one field of the answer.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HEADER: usize = 16;
/// inet_diag_req_v2: family, protocol, ext, pad, states (u32), then the socket id.
const REQUEST: usize = 8 + SOCKET_ID;
/// inet_diag_sockid: sport, dport (big endian), src[4], dst[4] (big endian), if, cookie[2].
const SOCKET_ID: usize = 4 + 16 + 16 + 4 + 8;
/// In inet_diag_msg: family, state, timer, retrans, the socket id, expires, rqueue, wqueue,
/// then uid.
const UID_AT: usize = 4 + SOCKET_ID + 12;

/// The uid of the local process's socket at the other end of `stream`, if the peer is on this
/// host; `None` for a remote peer (or if the kernel does not say).
pub fn peer_uid(stream: &TcpStream) -> Option<u32> {
    let (peer, local) = (
        unmapped(stream.peer_addr().ok()?),
        unmapped(stream.local_addr().ok()?),
    );
    let answer = ask_kernel(&diag_request(peer, local)).ok()?;
    uid_in_answer(&answer)
}

/// An IPv4 peer of a dual-stack listener (`[::]:PORT`) shows as `::ffff:a.b.c.d`, but its
/// socket is an IPv4 one: look it up as what it is.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// The sock_diag request for the TCP socket whose local address is `peer` and remote address
/// `local` (the peer's end of our connection).
fn diag_request(peer: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let family: u8 = if peer.is_ipv4() { 2 } else { 10 }; // AF_INET, AF_INET6
    let ip = |a: SocketAddr| -> [u8; 16] {
        let mut out = [0u8; 16];
        match a.ip() {
            IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
        }
        out
    };
    let mut m = Vec::with_capacity(NLMSG_HEADER + REQUEST);
    m.extend_from_slice(&((NLMSG_HEADER + REQUEST) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    m.extend_from_slice(&[family, 6 /* IPPROTO_TCP */, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.extend_from_slice(&peer.port().to_be_bytes());
    m.extend_from_slice(&local.port().to_be_bytes());
    m.extend_from_slice(&ip(peer));
    m.extend_from_slice(&ip(local));
    m.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    m.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    m
}

/// Sends one request on a new sock_diag socket and returns the answer, waiting at most 100 ms
/// (an exact lookup takes microseconds).
fn ask_kernel(request: &[u8]) -> std::io::Result<Vec<u8>> {
    use rustix::net::{netlink, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        Some(netlink::SOCK_DIAG),
    )?;
    rustix::net::sockopt::set_socket_timeout(
        &fd,
        rustix::net::sockopt::Timeout::Recv,
        Some(Duration::from_millis(100)),
    )?;
    rustix::net::send(&fd, request, SendFlags::empty())?;
    let mut buf = vec![0u8; 1024];
    let (n, _) = rustix::net::recv(&fd, &mut buf, RecvFlags::empty())?;
    buf.truncate(n.min(buf.len()));
    Ok(buf)
}

/// The socket's uid in a sock_diag answer; `None` for an error answer (no such socket) or a
/// short one.
fn uid_in_answer(answer: &[u8]) -> Option<u32> {
    let kind = u16::from_ne_bytes(answer.get(4..6)?.try_into().ok()?);
    // An error answer (NLMSG_ERROR: no such socket) or anything else is no uid.
    if kind != SOCK_DIAG_BY_FAMILY {
        return None;
    }
    let at = NLMSG_HEADER + UID_AT;
    Some(u32::from_ne_bytes(answer.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn me() -> u32 {
        std::fs::metadata("/proc/self").unwrap().uid()
    }

    #[test]
    fn a_real_connection_is_found_and_a_closed_one_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_end, _) = listener.accept().unwrap();
        assert_eq!(peer_uid(&server_end), Some(me()));
        // The request names one socket: another port finds nothing.
        let mut other = client.local_addr().unwrap();
        other.set_port(other.port().wrapping_add(1).max(1));
        let answer = ask_kernel(&diag_request(other, server_end.local_addr().unwrap())).unwrap();
        assert_eq!(uid_in_answer(&answer), None);
    }

    /// A dual-stack listener sees an IPv4 client as `::ffff:127.0.0.1`: it is still found.
    #[test]
    fn an_ipv4_client_of_a_dual_stack_listener_is_found() {
        let Ok(listener) = std::net::TcpListener::bind("[::]:0") else {
            eprintln!("skipped: no IPv6 here");
            return;
        };
        let port = listener.local_addr().unwrap().port();
        let _client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server_end, from) = listener.accept().unwrap();
        assert!(matches!(from, SocketAddr::V6(_)), "{from}");
        assert_eq!(peer_uid(&server_end), Some(me()));
    }
}
