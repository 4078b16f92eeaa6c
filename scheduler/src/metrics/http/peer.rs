//! Who is on the other end of a loopback TCP connection: the kernel lists every TCP socket in
//! /proc/net/tcp and /proc/net/tcp6 with its owner's uid, so the peer's socket (its local address
//! is our peer address, its remote address ours) names the local user who connected. /metrics
//! limits connections per user with it, so no local user can hold every slot (a Unix socket would
//! give SO_PEERCRED, but Prometheus scrapes over TCP).

use std::net::{IpAddr, SocketAddr, TcpStream};

/// The uid of the local process's socket at the other end of `stream`, if the peer is on this
/// host and listed; `None` for a remote peer.
pub fn peer_uid(stream: &TcpStream) -> Option<u32> {
    let (peer, local) = (stream.peer_addr().ok()?, stream.local_addr().ok()?);
    let table = match peer {
        SocketAddr::V4(_) => "/proc/net/tcp",
        SocketAddr::V6(_) => "/proc/net/tcp6",
    };
    let text = std::fs::read_to_string(table).ok()?;
    find_uid(&text, peer, local)
}

/// The uid of the socket whose local address is `peer` and remote address `local`, in a
/// /proc/net/tcp{,6} listing.
pub fn find_uid(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let (want_local, want_remote) = (proc_addr(peer), proc_addr(local));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid ...
        let (l, r, uid) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
        (l.eq_ignore_ascii_case(&want_local) && r.eq_ignore_ascii_case(&want_remote))
            .then(|| uid.parse().ok())
            .flatten()
    })
}

/// An address as the kernel prints it there: each 32-bit word of the address as it lies in
/// memory, printed as a host-order number in hex, then the port in hex.
fn proc_addr(addr: SocketAddr) -> String {
    let words = |octets: &[u8]| -> String {
        octets
            .chunks(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
            .collect()
    };
    let ip = match addr.ip() {
        IpAddr::V4(v4) => words(&v4.octets()),
        IpAddr::V6(v6) => words(&v6.octets()),
    };
    format!("{ip}:{:04X}", addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peers_socket_names_its_owner() {
        // Recorded from this host: a client (uid 65534) on 127.0.0.1:41234 connected to
        // 127.0.0.1:9100, and the server's own end (uid 0).
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:238C 0100007F:A112 01 00000000:00000000 00:00000000 00000000     0        0 1001 1 0 20 4 30 10 -1\n\
   1: 0100007F:A112 0100007F:238C 01 00000000:00000000 00:00000000 00000000 65534        0 1002 1 0 20 4 30 10 -1\n";
        let client: SocketAddr = "127.0.0.1:41234".parse().unwrap();
        let server: SocketAddr = "127.0.0.1:9100".parse().unwrap();
        assert_eq!(find_uid(table, client, server), Some(65534));
        assert_eq!(find_uid(table, server, client), Some(0));
        let other: SocketAddr = "127.0.0.1:41235".parse().unwrap();
        assert_eq!(find_uid(table, other, server), None);
    }

    #[test]
    fn a_real_connection_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_end, _) = listener.accept().unwrap();
        use std::os::unix::fs::MetadataExt;
        let me = std::fs::metadata("/proc/self").unwrap().uid();
        assert_eq!(peer_uid(&server_end), Some(me));
    }
}
