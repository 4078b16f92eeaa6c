use super::*;

/// Backend processes, each with a native memfd vhost-user frontend (no VM): many guests' worth
/// of devices on one host.
pub(super) struct Fleet {
    pub backends: Vec<Backend>,
    /// Kept open for as long as the backends serve them.
    pub frontends: Vec<(TestFrontend, MemfdRam)>,
    /// Each backend's start until its sockets are up, then its frontend's connection, seconds.
    pub start_seconds: Vec<f64>,
    /// The guest RAM each backend learnt from its frontend's memory table.
    pub guest_ram_bytes: u64,
}

impl Fleet {
    /// Starts `count` backends named PREFIX0.., each serving a `ram_bytes` memfd frontend.
    pub fn start(prefix: &str, count: usize, ram_bytes: u64) -> Result<Fleet> {
        let mut fleet = Fleet {
            backends: Vec::with_capacity(count),
            frontends: Vec::with_capacity(count),
            start_seconds: Vec::with_capacity(count),
            guest_ram_bytes: 0,
        };
        for i in 0..count {
            let t = Instant::now();
            let b = Backend::start(
                &format!("{prefix}{i}"),
                &["--no-stats", "--no-free-page-reporting"],
            )?;
            let ram = guest_ram(ram_bytes)?;
            let fe = TestFrontend::connect(&b.socket, &ram)?;
            fleet.start_seconds.push(t.elapsed().as_secs_f64());
            fleet.backends.push(b);
            fleet.frontends.push((fe, ram));
        }
        fleet.guest_ram_bytes = match fleet.backends.first() {
            Some(b) => b.status()?.guest_ram_bytes,
            None => 0,
        };
        if count > 0 && fleet.guest_ram_bytes == 0 {
            return Err(balloon_lab::LabError::Other(
                "the backend has no memory table from its frontend".into(),
            ));
        }
        Ok(fleet)
    }
}
