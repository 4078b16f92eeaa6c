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

/// One message the backend accepted, with the reply it gave when the message asked for
/// something (a new backend must give the same answers).
#[derive(Debug)]
pub struct Entry {
    pub msg: Message,
    pub reply: Option<Vec<u8>>,
}

#[derive(Debug, Default)]
pub struct Journal {
    entries: Vec<Entry>,
    protocol_features: u64,
}

/// What stays through a reset: the negotiation of the connection.
fn is_negotiation(request: u32) -> bool {
    matches!(
        request,
        GET_FEATURES
            | GET_PROTOCOL_FEATURES
            | SET_PROTOCOL_FEATURES
            | GET_QUEUE_NUM
            | GET_MAX_MEM_SLOTS
            | SET_BACKEND_REQ_FD
    )
}

impl Journal {
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The protocol features the frontend set.
    pub fn protocol_features(&self) -> u64 {
        self.protocol_features
    }

    /// The frontend went away: the next one starts from nothing.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.protocol_features = 0;
    }

    fn remove_where(&mut self, mut f: impl FnMut(&Message) -> bool) {
        self.entries.retain(|e| !f(&e.msg));
    }

    /// Puts `entry` where the last message with the same `key` was, or at the end. In place
    /// for what later messages depend on (features before the rings that check them, the
    /// memory table before the ring addresses translated through it).
    fn replace_in_place(&mut self, entry: Entry, key: Key) {
        match self
            .entries
            .iter()
            .position(|e| key_of(&e.msg) == Some(key))
        {
            Some(first) => {
                self.entries[first] = entry;
                let mut i = 0;
                self.entries.retain(|e| {
                    let keep = i == first || key_of(&e.msg) != Some(key);
                    i += 1;
                    keep
                });
            }
            None => self.entries.push(entry),
        }
    }

    /// Notes a message the backend accepted, and its reply if it asked for something.
    pub fn record(&mut self, msg: Message, reply: Option<Vec<u8>>) {
        let entry = Entry { msg, reply };
        let msg = &entry.msg;
        match msg.request {
            // Questions that change nothing (asked again and again: QEMU reads the config
            // space through the backend on every guest read).
            GET_CONFIG | GET_STATUS | CHECK_DEVICE_STATE | VRING_KICK | SEND_RARP
            | GET_SHMEM_CONFIG => {}
            // Questions the backend may expect before what depends on them (our balloon notes
            // its sockets when asked for protocol features): asked once in a replay.
            GET_FEATURES
            | GET_PROTOCOL_FEATURES
            | GET_QUEUE_NUM
            | GET_MAX_MEM_SLOTS
            | SET_OWNER => {
                if !self.entries.iter().any(|e| e.msg.request == msg.request) {
                    self.entries.push(entry);
                }
            }
            // Stopping a ring ends its setup: what follows starts it afresh. QEMU sends the
            // error eventfd and the endianness once, not at each start: they stay.
            GET_VRING_BASE => {
                if let Some(ring) = ring_of(msg) {
                    self.remove_where(|m| {
                        is_ring_setup(m.request)
                            && !matches!(m.request, SET_VRING_ERR | SET_VRING_ENDIAN)
                            && ring_of(m) == Some(ring)
                    });
                }
            }
            // Back to the negotiation (and, after RESET_OWNER, without an owner).
            RESET_OWNER => self.remove_where(|m| !is_negotiation(m.request)),
            RESET_DEVICE => {
                self.remove_where(|m| !is_negotiation(m.request) && m.request != SET_OWNER)
            }
            // A new memory table replaces the old one in place, and the regions added to it.
            SET_MEM_TABLE => {
                self.remove_where(|m| matches!(m.request, ADD_MEM_REG | REM_MEM_REG));
                self.replace_in_place(entry, Key::Request(SET_MEM_TABLE));
            }
            ADD_MEM_REG => self.entries.push(entry),
            // A region removed again: the two cancel out (VhostUserMemRegMsg: padding, then
            // the region's guest address, size, frontend address).
            REM_MEM_REG => {
                let region = msg.payload.get(8..32).map(<[u8]>::to_vec);
                let before = self.entries.len();
                self.remove_where(|m| {
                    m.request == ADD_MEM_REG && m.payload.get(8..32).map(<[u8]>::to_vec) == region
                });
                if self.entries.len() == before {
                    self.entries.push(entry);
                }
            }
            SET_PROTOCOL_FEATURES => {
                self.protocol_features = msg.u64_at(0).unwrap_or(0);
                self.replace_in_place(entry, Key::Request(SET_PROTOCOL_FEATURES));
            }
            SET_FEATURES | SET_BACKEND_REQ_FD | SET_LOG_BASE | SET_LOG_FD | SET_STATUS => {
                let key = Key::Request(msg.request);
                self.replace_in_place(entry, key);
            }
            // The latest word on a ring or a piece of config comes last.
            _ => {
                if let Some(key) = key_of(msg) {
                    self.remove_where(|m| key_of(m) == Some(key));
                }
                self.entries.push(entry);
            }
        }
    }

    /// The memory regions the frontend described (the latest table, with regions added and
    /// removed since).
    pub fn regions(&self) -> Vec<MemoryRegion<'_>> {
        let mut out = Vec::new();
        for m in self.entries.iter().map(|e| &e.msg) {
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
            .map(|e| &e.msg)
            .rev()
            .find(|m| m.request == SET_VRING_ADDR && ring_of(m) == Some(index))
            // VhostUserVringAddr: index u32, flags u32, descriptor u64, used u64, ...
            .and_then(|m| m.u64_at(16))
    }

    /// The eventfds of every ring's kick and call, for a nudge after a replay.
    pub fn ring_eventfds(&self) -> Vec<BorrowedFd<'_>> {
        self.entries
            .iter()
            .map(|e| &e.msg)
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
            .map(|e| (e.msg.request, ring_of(&e.msg)))
            .collect()
    }

    fn start_ring(j: &mut Journal, index: u32, base: u32) {
        j.record(state(SET_VRING_NUM, index, 256), None);
        j.record(state(SET_VRING_BASE, index, base), None);
        let mut addr = index.to_le_bytes().to_vec();
        addr.extend_from_slice(&[0; 4]);
        for a in [0x1000u64, 0x3000, 0x2000, 0] {
            addr.extend_from_slice(&(a + u64::from(index) * 0x10000).to_le_bytes());
        }
        j.record(msg(SET_VRING_ADDR, addr), None);
        j.record(ring_fd(SET_VRING_KICK, u64::from(index)), None);
        j.record(ring_fd(SET_VRING_CALL, u64::from(index)), None);
        j.record(state(SET_VRING_ENABLE, index, 1), None);
    }

    #[test]
    fn a_reboot_leaves_one_device_start_behind() {
        let mut j = Journal::default();
        for r in [GET_FEATURES, GET_PROTOCOL_FEATURES] {
            j.record(msg(r, Vec::new()), None);
        }
        j.record(
            msg(SET_PROTOCOL_FEATURES, 0x8u64.to_le_bytes().to_vec()),
            None,
        );
        j.record(msg(SET_OWNER, Vec::new()), None);
        for boot in 0..3 {
            j.record(msg(GET_CONFIG, vec![0; 12 + 8]), None);
            j.record(
                msg(SET_FEATURES, (1u64 << 32 | boot).to_le_bytes().to_vec()),
                None,
            );
            j.record(msg(SET_MEM_TABLE, vec![0; 8]), None);
            start_ring(&mut j, 0, 0);
            start_ring(&mut j, 1, 0);
            let mut cfg = 0u32.to_le_bytes().to_vec();
            cfg.extend_from_slice(&8u32.to_le_bytes());
            cfg.extend_from_slice(&[0; 4 + 8]);
            j.record(msg(SET_CONFIG, cfg), None);
            // The guest reboots: QEMU stops both rings.
            if boot < 2 {
                j.record(state(GET_VRING_BASE, 0, 0), None);
                j.record(state(GET_VRING_BASE, 1, 0), None);
                j.record(msg(GET_FEATURES, Vec::new()), None);
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
            .find(|e| e.msg.request == SET_FEATURES)
            .unwrap();
        assert_eq!(last_features.msg.u64_at(0), Some(1 << 32 | 2));
        assert_eq!(j.used_ring_addr(1), Some(0x13000));
        assert_eq!(j.protocol_features(), crate::message::PROTOCOL_F_REPLY_ACK);
    }

    #[test]
    fn a_later_setting_of_a_ring_replaces_the_earlier_one() {
        let mut j = Journal::default();
        start_ring(&mut j, 0, 0);
        j.record(ring_fd(SET_VRING_CALL, 0x100), None); // "no descriptor" for ring 0
        j.record(ring_fd(SET_VRING_CALL, 1), None);
        let calls: Vec<u64> = j
            .entries()
            .iter()
            .filter(|e| e.msg.request == SET_VRING_CALL)
            .map(|e| e.msg.u64_at(0).unwrap())
            .collect();
        assert_eq!(calls, vec![0x100, 1]);
        // A short payload has no ring: kept, never confused with ring 0.
        j.record(msg(SET_VRING_NUM, vec![0; 2]), None);
        assert_eq!(
            j.entries()
                .iter()
                .filter(|e| e.msg.request == SET_VRING_NUM)
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
        j.record(m, None);
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

    #[test]
    fn a_memory_table_sent_again_keeps_its_place_before_the_rings() {
        let mut j = Journal::default();
        j.record(msg(SET_FEATURES, 1u64.to_le_bytes().to_vec()), None);
        j.record(msg(SET_MEM_TABLE, vec![0; 8]), None);
        start_ring(&mut j, 0, 0);
        j.record(ring_fd(SET_VRING_ERR, 0), None);
        // Memory hotplug while the ring runs; later a new negotiation after a reboot.
        j.record(msg(SET_MEM_TABLE, vec![1; 8]), None);
        j.record(state(GET_VRING_BASE, 0, 0), None);
        j.record(msg(SET_FEATURES, 2u64.to_le_bytes().to_vec()), None);
        start_ring(&mut j, 0, 0);
        let r: Vec<u32> = j.entries().iter().map(|e| e.msg.request).collect();
        assert_eq!(&r[..3], &[SET_FEATURES, SET_MEM_TABLE, SET_VRING_ERR]);
        assert_eq!(j.entries()[1].msg.payload, vec![1; 8]);
        assert_eq!(j.entries()[0].msg.u64_at(0), Some(2));
        assert_eq!(r.iter().filter(|q| **q == SET_VRING_KICK).count(), 1);
    }

    #[test]
    fn added_and_removed_regions_cancel_and_resets_go_back_to_the_negotiation() {
        let mut j = Journal::default();
        j.record(msg(GET_FEATURES, Vec::new()), Some(vec![0; 8]));
        j.record(
            msg(SET_PROTOCOL_FEATURES, 0x8u64.to_le_bytes().to_vec()),
            None,
        );
        j.record(msg(SET_OWNER, Vec::new()), None);
        let region = |gpa: u8| {
            let mut p = vec![0u8; 8];
            p.extend_from_slice(&[gpa; 32]);
            p
        };
        j.record(msg(ADD_MEM_REG, region(1)), None);
        j.record(msg(ADD_MEM_REG, region(2)), None);
        j.record(msg(REM_MEM_REG, region(1)), None);
        let adds: Vec<u8> = j
            .entries()
            .iter()
            .filter(|e| e.msg.request == ADD_MEM_REG)
            .map(|e| e.msg.payload[8])
            .collect();
        assert_eq!(adds, vec![2]);
        assert!(!j.entries().iter().any(|e| e.msg.request == REM_MEM_REG));
        start_ring(&mut j, 0, 0);
        j.record(msg(RESET_DEVICE, Vec::new()), None);
        let r: Vec<u32> = j.entries().iter().map(|e| e.msg.request).collect();
        assert_eq!(r, vec![GET_FEATURES, SET_PROTOCOL_FEATURES, SET_OWNER]);
        j.record(msg(RESET_OWNER, Vec::new()), None);
        j.record(msg(SET_OWNER, Vec::new()), None);
        let r: Vec<u32> = j.entries().iter().map(|e| e.msg.request).collect();
        assert_eq!(r, vec![GET_FEATURES, SET_PROTOCOL_FEATURES, SET_OWNER]);
        assert_eq!(j.entries()[0].reply, Some(vec![0; 8]));
    }
}
