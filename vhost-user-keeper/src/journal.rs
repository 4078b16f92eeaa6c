//! What the frontend told the backend, kept so that a new backend process can be told the same:
//! the negotiation, the memory table, every ring's setup and the descriptors that came with
//! them. Only the latest word on each piece of state is kept, so the journal stays the size of
//! one device start however long the VM runs (a guest that reboots a thousand times does not
//! leave a thousand memory tables behind).

use crate::message::{request::*, Message};
use std::os::fd::{AsFd, BorrowedFd};

/// The ring a per-ring message is about.
fn ring_of(msg: &Message) -> Option<u32> {
    match msg.request {
        SET_VRING_NUM | SET_VRING_ADDR | SET_VRING_BASE | GET_VRING_BASE | SET_VRING_ENABLE
        | SET_VRING_ENDIAN => msg.u32_at(0),
        // The index is the low byte of a u64; bit 8 says "no descriptor".
        SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => msg.u64_at(0).map(|v| (v & 0xff) as u32),
        _ => None,
    }
}

fn is_ring_setup(request: u32) -> bool {
    matches!(
        request,
        SET_VRING_NUM
            | SET_VRING_ADDR
            | SET_VRING_BASE
            | SET_VRING_KICK
            | SET_VRING_CALL
            | SET_VRING_ERR
            | SET_VRING_ENABLE
            | SET_VRING_ENDIAN
    )
}

/// What identifies the piece of state a message sets: a later message with the same key
/// replaces the earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Request(u32),
    Ring(u32, u32),
    /// SET_CONFIG at (offset, size).
    Config(u32, u32),
}

fn key_of(msg: &Message) -> Option<Key> {
    match msg.request {
        r if is_ring_setup(r) => ring_of(msg).map(|i| Key::Ring(r, i)),
        SET_CONFIG => Some(Key::Config(msg.u32_at(0)?, msg.u32_at(4)?)),
        _ => Some(Key::Request(msg.request)),
    }
}

#[derive(Debug, Default)]
pub struct Journal {
    entries: Vec<Message>,
    protocol_features: u64,
}

impl Journal {
    pub fn entries(&self) -> &[Message] {
        &self.entries
    }

    /// The protocol features the frontend set (REPLY_ACK and LOG_SHMFD change which messages
    /// have replies).
    pub fn protocol_features(&self) -> u64 {
        self.protocol_features
    }

    /// The frontend went away: the next one starts from nothing.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.protocol_features = 0;
    }

    fn remove_where(&mut self, mut f: impl FnMut(&Message) -> bool) {
        self.entries.retain(|m| !f(m));
    }

    /// Notes a message the backend has taken.
    pub fn record(&mut self, msg: Message) {
        match msg.request {
            // Questions that change nothing (asked again and again: QEMU reads the config
            // space through the backend on every guest read).
            GET_CONFIG | GET_STATUS | CHECK_DEVICE_STATE | VRING_KICK | SEND_RARP => {}
            // Questions the backend may expect before what depends on them (our balloon notes
            // its sockets when asked for protocol features): asked once in a replay.
            GET_FEATURES
            | GET_PROTOCOL_FEATURES
            | GET_QUEUE_NUM
            | GET_MAX_MEM_SLOTS
            | SET_OWNER => {
                if !self.entries.iter().any(|m| m.request == msg.request) {
                    self.entries.push(msg);
                }
            }
            // Stopping a ring ends its setup: what follows starts it afresh.
            GET_VRING_BASE => {
                if let Some(ring) = ring_of(&msg) {
                    self.remove_where(|m| is_ring_setup(m.request) && ring_of(m) == Some(ring));
                }
            }
            RESET_OWNER | RESET_DEVICE => {
                self.remove_where(|m| is_ring_setup(m.request) || m.request == SET_FEATURES);
                self.entries.push(msg);
            }
            // A new memory table replaces every earlier one and the regions added to it.
            SET_MEM_TABLE => {
                self.remove_where(|m| {
                    matches!(m.request, SET_MEM_TABLE | ADD_MEM_REG | REM_MEM_REG)
                });
                self.entries.push(msg);
            }
            ADD_MEM_REG | REM_MEM_REG => self.entries.push(msg),
            _ => {
                if msg.request == SET_PROTOCOL_FEATURES {
                    self.protocol_features = msg.u64_at(0).unwrap_or(0);
                }
                if let Some(key) = key_of(&msg) {
                    self.remove_where(|m| key_of(m) == Some(key));
                }
                self.entries.push(msg);
            }
        }
    }

    /// The memory regions the frontend described, as (frontend address, size, file offset,
    /// descriptor).
    pub fn regions(&self) -> Vec<MemoryRegion<'_>> {
        let mut out = Vec::new();
        for m in &self.entries {
            match m.request {
                SET_MEM_TABLE => {
                    let n = m.u32_at(0).unwrap_or(0) as usize;
                    for (i, fd) in m.fds.iter().enumerate().take(n) {
                        if let Some(r) = MemoryRegion::parse(m, 8 + i * 32, fd.as_fd()) {
                            out.push(r);
                        }
                    }
                }
                ADD_MEM_REG => {
                    if let Some(fd) = m.fds.first() {
                        out.extend(MemoryRegion::parse(m, 8, fd.as_fd()));
                    }
                }
                REM_MEM_REG => {
                    if let Some(gone) = m.u64_at(8 + 16) {
                        out.retain(|r| r.frontend_addr != gone);
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// The frontend address of ring `index`'s used ring, if its addresses were set.
    pub fn used_ring_addr(&self, index: u32) -> Option<u64> {
        self.entries
            .iter()
            .rev()
            .find(|m| m.request == SET_VRING_ADDR && ring_of(m) == Some(index))
            // VhostUserVringAddr: index u32, flags u32, descriptor u64, used u64, ...
            .and_then(|m| m.u64_at(16))
    }

    /// The eventfds of every ring's kick and call, for a nudge after a replay.
    pub fn ring_eventfds(&self) -> Vec<BorrowedFd<'_>> {
        self.entries
            .iter()
            .filter(|m| matches!(m.request, SET_VRING_KICK | SET_VRING_CALL))
            .flat_map(|m| m.fds.iter().map(|f| f.as_fd()))
            .collect()
    }
}

/// One region of guest memory as the frontend described it.
#[derive(Debug, Clone, Copy)]
pub struct MemoryRegion<'a> {
    pub guest_phys_addr: u64,
    pub size: u64,
    /// Where the frontend mapped it: ring addresses are given in this address space.
    pub frontend_addr: u64,
    pub mmap_offset: u64,
    pub fd: BorrowedFd<'a>,
}

impl<'a> MemoryRegion<'a> {
    /// VhostUserMemoryRegion at `offset`: guest address, size, frontend address, mmap offset.
    fn parse(m: &Message, offset: usize, fd: BorrowedFd<'a>) -> Option<Self> {
        Some(MemoryRegion {
            guest_phys_addr: m.u64_at(offset)?,
            size: m.u64_at(offset + 8)?,
            frontend_addr: m.u64_at(offset + 16)?,
            mmap_offset: m.u64_at(offset + 24)?,
            fd,
        })
    }

    /// The file offset behind `len` bytes at frontend address `addr`, if the region has them.
    pub fn file_offset(&self, addr: u64, len: u64) -> Option<u64> {
        let rel = addr.checked_sub(self.frontend_addr)?;
        if rel.checked_add(len)? > self.size {
            return None;
        }
        self.mmap_offset.checked_add(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::FLAG_VERSION_1;

    fn msg(request: u32, payload: Vec<u8>) -> Message {
        Message::new(request, FLAG_VERSION_1, payload)
    }

    fn state(request: u32, index: u32, num: u32) -> Message {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&num.to_le_bytes());
        msg(request, p)
    }

    fn ring_fd(request: u32, index: u64) -> Message {
        msg(request, index.to_le_bytes().to_vec())
    }

    fn requests(j: &Journal) -> Vec<(u32, Option<u32>)> {
        j.entries()
            .iter()
            .map(|m| (m.request, ring_of(m)))
            .collect()
    }

    fn start_ring(j: &mut Journal, index: u32, base: u32) {
        j.record(state(SET_VRING_NUM, index, 256));
        j.record(state(SET_VRING_BASE, index, base));
        let mut addr = index.to_le_bytes().to_vec();
        addr.extend_from_slice(&[0; 4]);
        for a in [0x1000u64, 0x3000, 0x2000, 0] {
            addr.extend_from_slice(&(a + u64::from(index) * 0x10000).to_le_bytes());
        }
        j.record(msg(SET_VRING_ADDR, addr));
        j.record(ring_fd(SET_VRING_KICK, u64::from(index)));
        j.record(ring_fd(SET_VRING_CALL, u64::from(index)));
        j.record(state(SET_VRING_ENABLE, index, 1));
    }

    #[test]
    fn a_reboot_leaves_one_device_start_behind() {
        let mut j = Journal::default();
        for r in [GET_FEATURES, GET_PROTOCOL_FEATURES] {
            j.record(msg(r, Vec::new()));
        }
        j.record(msg(SET_PROTOCOL_FEATURES, 0x8u64.to_le_bytes().to_vec()));
        j.record(msg(SET_OWNER, Vec::new()));
        for boot in 0..3 {
            j.record(msg(GET_CONFIG, vec![0; 12 + 8]));
            j.record(msg(
                SET_FEATURES,
                (1u64 << 32 | boot).to_le_bytes().to_vec(),
            ));
            j.record(msg(SET_MEM_TABLE, vec![0; 8]));
            start_ring(&mut j, 0, 0);
            start_ring(&mut j, 1, 0);
            let mut cfg = 0u32.to_le_bytes().to_vec();
            cfg.extend_from_slice(&8u32.to_le_bytes());
            cfg.extend_from_slice(&[0; 4 + 8]);
            j.record(msg(SET_CONFIG, cfg));
            // The guest reboots: QEMU stops both rings.
            if boot < 2 {
                j.record(state(GET_VRING_BASE, 0, 0));
                j.record(state(GET_VRING_BASE, 1, 0));
                j.record(msg(GET_FEATURES, Vec::new()));
            }
        }
        let r = requests(&j);
        assert_eq!(r.iter().filter(|(q, _)| *q == SET_MEM_TABLE).count(), 1);
        assert_eq!(r.iter().filter(|(q, _)| *q == SET_FEATURES).count(), 1);
        assert_eq!(r.iter().filter(|(q, _)| *q == SET_CONFIG).count(), 1);
        assert_eq!(r.iter().filter(|(q, _)| *q == GET_FEATURES).count(), 1);
        assert!(!r
            .iter()
            .any(|(q, _)| *q == GET_CONFIG || *q == GET_VRING_BASE));
        assert_eq!(r.iter().filter(|(_, i)| *i == Some(0)).count(), 6);
        // The order of the last start is kept, and the negotiation comes first.
        assert_eq!(r[0].0, GET_FEATURES);
        assert_eq!(r[3].0, SET_OWNER);
        let last_features = j
            .entries()
            .iter()
            .find(|m| m.request == SET_FEATURES)
            .unwrap();
        assert_eq!(last_features.u64_at(0), Some(1 << 32 | 2));
        assert_eq!(j.used_ring_addr(1), Some(0x13000));
        assert_eq!(j.protocol_features(), crate::message::PROTOCOL_F_REPLY_ACK);
    }

    #[test]
    fn a_later_setting_of_a_ring_replaces_the_earlier_one() {
        let mut j = Journal::default();
        start_ring(&mut j, 0, 0);
        j.record(ring_fd(SET_VRING_CALL, 0x100)); // "no descriptor" for ring 0
        j.record(ring_fd(SET_VRING_CALL, 1));
        let calls: Vec<u64> = j
            .entries()
            .iter()
            .filter(|m| m.request == SET_VRING_CALL)
            .map(|m| m.u64_at(0).unwrap())
            .collect();
        assert_eq!(calls, vec![0x100, 1]);
        // A short payload has no ring: kept, never confused with ring 0.
        j.record(msg(SET_VRING_NUM, vec![0; 2]));
        assert_eq!(
            j.entries()
                .iter()
                .filter(|m| m.request == SET_VRING_NUM)
                .count(),
            2
        );
    }

    #[test]
    fn memory_regions_translate_frontend_addresses() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut table = 2u32.to_le_bytes().to_vec();
        table.extend_from_slice(&[0; 4]);
        for (gpa, size, ua, off) in [
            (0u64, 0x8000_0000u64, 0x7f00_0000_0000u64, 0u64),
            (1 << 32, 1 << 30, 0x7f80_0000_0000, 0x8000_0000),
        ] {
            for v in [gpa, size, ua, off] {
                table.extend_from_slice(&v.to_le_bytes());
            }
        }
        let mut m = msg(SET_MEM_TABLE, table);
        m.fds.push(file.try_clone().unwrap().into());
        m.fds.push(file.into());
        let mut j = Journal::default();
        j.record(m);
        let regions = j.regions();
        assert_eq!(regions.len(), 2);
        assert_eq!(
            regions[1].file_offset(0x7f80_0000_1000, 2),
            Some(0x8000_1000)
        );
        assert_eq!(
            regions[0].file_offset(0x7f00_0000_0000 + 0x8000_0000 - 1, 2),
            None
        );
        assert_eq!(regions[0].file_offset(0x10, 2), None);
    }
}
