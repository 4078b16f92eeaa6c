//! Binding the daemons' Unix sockets without harming what is already there.
//!
//! - A path that exists and is not a socket (a regular file, a directory, a symlink) is never
//!   removed: binding fails with an error that says so.
//! - A socket another process still serves (a connection to it succeeds, or its backlog is
//!   full) is never taken over: binding fails and names the path. Only a stale socket (nobody
//!   listens: the connection is refused) is replaced.
//! - The socket is created with its final mode: the mode is set on the socket before `bind`,
//!   which Linux uses (less the umask) for the new file, so there is no moment where it is
//!   reachable with the umask's looser mode. A group, if given, is set afterwards and only then
//!   the group bits.
//! - On shutdown, [`SocketPath::remove`] removes the path only if it is still the socket this
//!   process bound (another process may have replaced it meanwhile).
//!
//! And connecting to one ([`connect`]) without ever hanging.

use socket2::{Domain, SockAddr, Socket, Type};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{}: exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error(
        "{}: another process is serving this socket; stop it first (or choose another path)",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Who may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The group that may connect too (mode 0660); `None`: the owner only (0600).
    pub group: Option<u32>,
}

impl Access {
    pub const OWNER_ONLY: Access = Access { group: None };

    fn final_mode(self) -> u32 {
        if self.group.is_some() {
            0o660
        } else {
            0o600
        }
    }
}

/// A socket path this process bound: removed on shutdown only while it is still ours.
#[derive(Debug, Clone)]
pub struct SocketPath {
    path: PathBuf,
    /// Device, inode and change time: an inode number alone may be reused by the next socket.
    identity: (u64, u64, i64, i64),
}

fn identity(m: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
}

impl SocketPath {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket if the path still names the one this process bound.
    pub fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if identity(&m) == self.identity => {
                let _ = std::fs::remove_file(&self.path);
            }
            _ => {}
        }
    }
}

/// Whether some process accepts connections on the socket at `path`. A non-blocking connect
/// never waits: a full backlog (EAGAIN) also means somebody listens.
fn served(path: &Path) -> io::Result<bool> {
    let probe = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    match probe.connect(&SockAddr::unix(path)?) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Binds a listening Unix socket at `path` (see the module's rules).
pub fn bind(path: &Path, access: Access) -> Result<(UnixListener, SocketPath), BindError> {
    let err = |source| BindError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if served(path).map_err(err)? {
                return Err(BindError::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(BindError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None).map_err(err)?;
    // Linux creates the socket file with this mode (less the umask) at bind.
    rustix::fs::fchmod(&socket, rustix::fs::Mode::from_raw_mode(0o600))
        .map_err(|e| err(e.into()))?;
    socket
        .bind(&SockAddr::unix(path).map_err(err)?)
        .map_err(err)?;
    socket.listen(libc::SOMAXCONN).map_err(err)?;
    let listener: UnixListener = socket.into();
    if let Some(gid) = access.group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.final_mode()))
            .map_err(err)?;
    }
    let m = std::fs::symlink_metadata(path).map_err(err)?;
    Ok((
        listener,
        SocketPath {
            path: path.to_path_buf(),
            identity: identity(&m),
        },
    ))
}

/// Connects to the Unix stream socket at `path` without ever waiting: the one connect of every
/// client in the project. `UnixStream::connect` blocks without limit while the listener's
/// queue is full (a VMM that stopped accepting, a QMP monitor serving another client), and
/// socket2's `connect_timeout` takes a full queue (EAGAIN) for a connect in progress and
/// reports a puzzling POLLHUP. A Unix connect either completes at once or fails, so a
/// non-blocking one says which: a full queue is a clear error at once, since waiting for room
/// would only hold the caller's thread on a peer that is not accepting.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.is_empty() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a usable socket path (empty, or a NUL byte)",
        ));
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    match socket.connect(&SockAddr::unix(path)?) {
        Ok(()) => {
            socket.set_nonblocking(false)?;
            Ok(socket.into())
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{}: the listener's queue is full", path.display()),
        )),
        Err(e) => Err(e),
    }
}

/// Resolves a group name (or a number) to its id.
pub fn group_id(name: &str) -> io::Result<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group")?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let n = f.next()?;
            let _ = f.next()?;
            let gid = f.next()?.parse::<u32>().ok()?;
            (n == name).then_some(gid)
        })
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no group {name:?} in /etc/group"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connecting_never_hangs() {
        let long = Path::new("/tmp").join("x".repeat(200));
        assert_eq!(
            connect(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            connect(Path::new("")).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        // A listener that accepts nothing, its queue full: an error at once, not a wait.
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("full.sock");
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        listener.listen(0).unwrap();
        let mut queued = Vec::new();
        let refused = loop {
            match connect(&path) {
                Ok(s) => queued.push(s),
                Err(e) => break e,
            }
            assert!(queued.len() < 64, "the queue never filled");
        };
        assert_eq!(refused.kind(), io::ErrorKind::TimedOut, "{refused:?}");
        assert!(refused.to_string().contains("queue is full"), "{refused}");
    }
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_regular_file_is_never_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data.txt");
        std::fs::write(&p, "precious").unwrap();
        assert!(matches!(
            bind(&p, Access::OWNER_ONLY),
            Err(BindError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "precious");
        // Nor is a symlink to a socket followed.
        let s = d.path().join("real.sock");
        let _live = bind(&s, Access::OWNER_ONLY).unwrap();
        let link = d.path().join("link.sock");
        std::os::unix::fs::symlink(&s, &link).unwrap();
        assert!(matches!(
            bind(&link, Access::OWNER_ONLY),
            Err(BindError::NotASocket { .. })
        ));
    }

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.sock");
        let (first, path) = bind(&p, Access::OWNER_ONLY).unwrap();
        let e = bind(&p, Access::OWNER_ONLY).unwrap_err();
        assert!(matches!(e, BindError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("c.sock"), "{e}");
        // The first still serves at its path.
        assert!(std::os::unix::net::UnixStream::connect(&p).is_ok());
        drop(first);
        // Stale now (nobody listens): replaced.
        let (_second, path2) = bind(&p, Access::OWNER_ONLY).unwrap();
        // The first process's cleanup must not remove the second's socket.
        path.remove();
        assert!(p.exists());
        path2.remove();
        assert!(!p.exists());
    }

    #[test]
    fn created_with_the_final_mode_whatever_the_umask() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.sock");
        // umask is process-wide; this test only loosens it, which makes the check stricter for
        // other tests too, never weaker.
        use rustix::fs::Mode;
        let old = rustix::process::umask(Mode::from_raw_mode(0o002));
        let r = bind(&p, Access::OWNER_ONLY);
        rustix::process::umask(old);
        let (_l, _p) = r.unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let gid = rustix::process::getgid().as_raw();
        let q = d.path().join("g.sock");
        let (_l2, _p2) = bind(&q, Access { group: Some(gid) }).unwrap();
        let m = std::fs::metadata(&q).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o660);
        assert_eq!(m.gid(), gid);
    }

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!(group_id("0").unwrap(), 0);
        assert_eq!(group_id("root").unwrap(), 0);
        assert!(group_id("no-such-group-here").is_err());
    }
}
