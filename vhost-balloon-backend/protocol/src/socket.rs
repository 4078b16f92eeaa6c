//! Binding the daemons' Unix sockets without harming what is already there.
//!
//! - A path that exists and is not a socket (a regular file, a directory, a symlink) is never
//!   removed: binding fails with an error that says so.
//! - A socket another process still serves (a connection to it succeeds, or its backlog is
//!   full) is never taken over: binding fails and names the path. Only a stale socket (nobody
//!   listens: the connection is refused) is replaced.
//! - The socket is created in a private directory beside its path (mode 0700, this process's,
//!   checked through the descriptor it is opened with), given its group and mode there, and
//!   only then renamed to its path (never over anything that appeared there meanwhile). Nothing
//!   is done by the shared path but that rename, so a user who can write the socket's directory
//!   cannot make a chown or chmod follow a symlink planted in the socket's place, and the socket
//!   is never reachable with another mode. In a setgid directory whose group is the one asked
//!   for (systemd's `RuntimeDirectory=` with `Group=`, or `chgrp` + `chmod g+s`), the socket
//!   inherits the group and no chown is needed, so no CAP_CHOWN either.
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

/// Binds a listening socket in a new private directory beside `path`, sets its group and mode
/// there, and renames it to `path` (which must not exist by then).
fn bind_privately(path: &Path, access: Access) -> io::Result<UnixListener> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a socket path needs a name"))?;
    // The socket's directory may itself be a symlink (/var/run to /run); the private directory
    // made in it is opened without following one.
    let parent_fd = rustix::fs::open(
        parent,
        OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::RDONLY,
        Mode::empty(),
    )?;
    let dir_flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::RDONLY;
    let private = private_dir_name(name);
    rustix::fs::mkdirat(&parent_fd, &private, Mode::from_raw_mode(0o700))?;
    let bound = rustix::fs::openat(&parent_fd, &private, dir_flags, Mode::empty())
        .map_err(io::Error::from)
        .and_then(|dir| {
            let bound = bind_in(&dir, &parent_fd, name, access);
            if bound.is_err() {
                let _ = rustix::fs::unlinkat(&dir, "s", AtFlags::empty());
            }
            bound
        });
    // Empty by now (renamed, or unlinked above); a directory someone swapped in is not
    // emptied, and this fails.
    let _ = rustix::fs::unlinkat(&parent_fd, &private, AtFlags::REMOVEDIR);
    bound
}

/// Binds socket `s` in the private directory `dir` (checked to be this process's and private
/// first), sets its group and mode there, and renames it to `name` in `parent`.
fn bind_in(
    dir: &std::os::fd::OwnedFd,
    parent: &std::os::fd::OwnedFd,
    name: &std::ffi::OsStr,
    access: Access,
) -> io::Result<UnixListener> {
    use rustix::fs::{AtFlags, Mode, RenameFlags};
    // The directory opened must be the one made: this process's, private, not swapped.
    let st = rustix::fs::fstat(dir)?;
    if st.st_uid != rustix::process::geteuid().as_raw() || st.st_mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the private directory for binding was replaced",
        ));
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)?;
    // Linux creates the socket file with this mode (less the umask) at bind.
    rustix::fs::fchmod(&socket, Mode::from_raw_mode(0o600))?;
    // Through the directory's descriptor: no path another user can change, and short.
    let fd = std::os::fd::AsRawFd::as_raw_fd(dir);
    socket.bind(&SockAddr::unix(format!("/proc/self/fd/{fd}/s"))?)?;
    socket.listen(libc::SOMAXCONN)?;
    if let Some(gid) = access.group {
        let st = rustix::fs::statat(dir, "s", AtFlags::SYMLINK_NOFOLLOW)?;
        if st.st_gid != gid {
            let gid = rustix::fs::Gid::from_raw(gid);
            rustix::fs::chownat(dir, "s", None, Some(gid), AtFlags::SYMLINK_NOFOLLOW)?;
        }
        // Nobody else can enter the directory, so "s" is the socket just bound.
        rustix::fs::chmodat(
            dir,
            "s",
            Mode::from_raw_mode(access.final_mode()),
            AtFlags::empty(),
        )?;
    }
    rustix::fs::renameat_with(dir, "s", parent, name, RenameFlags::NOREPLACE).map_err(|e| {
        if e == rustix::io::Errno::EXIST {
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "something appeared at the socket's path while it was bound",
            )
        } else {
            io::Error::from(e)
        }
    })?;
    Ok(UnixListener::from(socket))
}

/// A fresh name for the private directory beside socket `name`: `.NAME.PID.NANOS.N`, so that
/// one a killed process left behind (with the same PID, as PID 1 in a container) is never in the
/// way.
fn private_dir_name(name: &std::ffi::OsStr) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut dir = std::ffi::OsString::from(".");
    dir.push(name);
    dir.push(format!(
        ".{}.{nanos}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    PathBuf::from(dir)
}

/// Binds a listening Unix socket at `path` (see the module's rules).
pub fn bind(path: &Path, access: Access) -> Result<(UnixListener, SocketPath), BindError> {
    let err = |source| BindError::Io {
        path: path.to_path_buf(),
        source,
    };
    // The socket is bound through a short /proc path, so its own must be checked here: one too
    // long for a socket address would bind, and nobody could connect to it.
    SockAddr::unix(path).map_err(err)?;
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
    let listener = bind_privately(path, access).map_err(err)?;
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

    /// A user who can write the socket's directory renames each new socket away and plants a
    /// symlink to a root-only file in its place, racing the bind: the file keeps its owner, group
    /// and mode (before, the chown and chmod by path followed the symlink now and then: the file
    /// became root:GROUP 0660).
    #[test]
    fn a_symlink_planted_in_the_sockets_place_is_never_followed() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root to give the socket another group");
            return;
        }
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "secret").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let sock = d.path().join("v.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let attacker = {
            let (sock, victim, stop, dir) = (
                sock.clone(),
                victim.clone(),
                stop.clone(),
                d.path().to_path_buf(),
            );
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if std::fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket()) {
                        n += 1;
                        let _ = std::fs::rename(&sock, dir.join(format!("moved.{n}")));
                        let _ = std::os::unix::fs::symlink(&victim, &sock);
                    }
                }
                n
            })
        };
        let group = Access { group: Some(65534) };
        for _ in 0..3000 {
            let _ = std::fs::remove_file(&sock);
            let _ = bind(&sock, group);
        }
        stop.store(true, Ordering::Relaxed);
        let swapped = attacker.join().unwrap();
        assert!(swapped > 0, "the attacker never saw a socket");
        let m = std::fs::metadata(&victim).unwrap();
        assert_eq!(
            (m.permissions().mode() & 0o777, m.gid()),
            (0o600, 0),
            "the planted symlink was followed ({swapped} sockets swapped)"
        );
    }

    /// A socket in a directory reached through a symlink (Debian's /var/run) binds; a path too
    /// long for a socket address is refused before anything is made.
    #[test]
    fn symlinked_directories_bind_and_overlong_paths_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("run");
        std::fs::create_dir(&real).unwrap();
        let link = d.path().join("var-run");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let (_l, p) = bind(&link.join("s.sock"), Access::OWNER_ONLY).unwrap();
        assert!(std::fs::symlink_metadata(real.join("s.sock"))
            .unwrap()
            .file_type()
            .is_socket());
        p.remove();
        let long = d.path().join("x".repeat(120));
        assert!(bind(&long, Access::OWNER_ONLY).is_err());
        assert!(std::fs::read_dir(d.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')));
    }

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!(group_id("0").unwrap(), 0);
        assert_eq!(group_id("root").unwrap(), 0);
        assert!(group_id("no-such-group-here").is_err());
    }
}
