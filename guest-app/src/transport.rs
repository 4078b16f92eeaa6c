//! The channel to the VM's backend: `serial:/dev/virtio-ports/NAME` (virtio-serial),
//! `vsock:CID:PORT` (the hybrid-vsock convention: the backend listens on the VMM's vsock socket
//! path suffixed with _PORT), and `unix:PATH` / `tcp:HOST:PORT` for tests outside VMs.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;

pub trait Stream: Read + Write + Send {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>>;
}

impl Stream for std::fs::File {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}
impl Stream for std::os::unix::net::UnixStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}
impl Stream for std::net::TcpStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}

fn vsock(cid: u32, port: u32) -> std::io::Result<std::fs::File> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::VSOCK, Type::STREAM.cloexec(), None)?;
    socket.connect(&SockAddr::vsock(cid, port))?;
    // A connected stream socket reads and writes like a file.
    Ok(std::fs::File::from(OwnedFd::from(socket)))
}

pub fn connect(spec: &str) -> Result<Box<dyn Stream>, String> {
    let (kind, rest) = spec
        .split_once(':')
        .ok_or_else(|| format!("--connect {spec:?}: expected KIND:ADDRESS"))?;
    let err = |e: std::io::Error| format!("{spec}: {e}");
    match kind {
        "serial" => Ok(Box::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(rest)
                .map_err(err)?,
        )),
        "unix" => Ok(Box::new(
            std::os::unix::net::UnixStream::connect(rest).map_err(err)?,
        )),
        "tcp" => Ok(Box::new(std::net::TcpStream::connect(rest).map_err(err)?)),
        "vsock" => {
            let (cid, port) = rest
                .split_once(':')
                .and_then(|(c, p)| Some((c.parse().ok()?, p.parse().ok()?)))
                .ok_or_else(|| format!("--connect {spec:?}: expected vsock:CID:PORT"))?;
            Ok(Box::new(vsock(cid, port).map_err(err)?))
        }
        other => Err(format!(
            "--connect {spec:?}: unknown transport {other:?} (serial, vsock, unix, tcp)"
        )),
    }
}
