//! The device's configuration space as the keeper last saw it, so that it can answer the
//! frontend's config reads itself while no backend is attached.
//!
//! Why: both VMMs read the config space through the backend synchronously, on every guest
//! access. QEMU does it in the vCPU thread (with the big lock held), so a read that waits for
//! a restarting backend stalls the guest; cloud-hypervisor panics when such a read fails. A
//! balloon's config (num_pages, actual) changes only when the host or the driver changes it,
//! so the last values seen are the right answer until a backend is back.
//!
//! What is learnt: every reply to GET_CONFIG the backend gave, and every SET_CONFIG the
//! frontend sent (the driver writing `actual`). A write made while no backend is attached is
//! journalled like any other, so the next backend gets it in the replay.

use crate::message::{request, Message, FLAG_REPLY, FLAG_VERSION_1};
use vhost::vhost_user::message::VHOST_USER_CONFIG_SIZE;

/// VhostUserConfig: offset, size, flags (u32 each), then `size` bytes of the space.
const HEADER: usize = 12;
const SPACE: usize = VHOST_USER_CONFIG_SIZE as usize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("a config message of {0} bytes, shorter than its header")]
    Short(usize),
    #[error("config bytes {offset}..{offset}+{size} (the space ends at {SPACE})")]
    OutOfRange { offset: u32, size: u32 },
    #[error("a config message naming {size} bytes but carrying {carried}")]
    SizeMismatch { size: u32, carried: usize },
}

/// One access: where, how much, and the bytes after the header.
struct Access<'a> {
    offset: usize,
    size: usize,
    flags: u32,
    data: &'a [u8],
}

fn parse(payload: &[u8]) -> Result<Access<'_>, ConfigError> {
    if payload.len() < HEADER {
        return Err(ConfigError::Short(payload.len()));
    }
    let word =
        |i: usize| u32::from_le_bytes([payload[i], payload[i + 1], payload[i + 2], payload[i + 3]]);
    let (offset, size, flags) = (word(0), word(4), word(8));
    let end = u64::from(offset) + u64::from(size);
    if size == 0 || end > SPACE as u64 {
        return Err(ConfigError::OutOfRange { offset, size });
    }
    let data = &payload[HEADER..];
    if data.len() != size as usize {
        return Err(ConfigError::SizeMismatch {
            size,
            carried: data.len(),
        });
    }
    Ok(Access {
        offset: offset as usize,
        size: size as usize,
        flags,
        data,
    })
}

#[derive(Debug)]
pub struct ConfigSpace {
    bytes: Vec<u8>,
    known: Vec<bool>,
}

impl Default for ConfigSpace {
    fn default() -> Self {
        ConfigSpace {
            bytes: vec![0; SPACE],
            known: vec![false; SPACE],
        }
    }
}

/// What the keeper answered a read with.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Every byte asked for had been seen.
    Known,
    /// Some had never been seen (the backend went away before anyone read them): those read
    /// as zeros, a device's reset value.
    PartlyUnknown,
}

impl ConfigSpace {
    /// Notes the bytes a GET_CONFIG reply or a SET_CONFIG request carries.
    pub fn learn(&mut self, payload: &[u8]) -> Result<(), ConfigError> {
        let a = parse(payload)?;
        self.bytes[a.offset..a.offset + a.size].copy_from_slice(a.data);
        self.known[a.offset..a.offset + a.size].fill(true);
        Ok(())
    }

    /// The reply to a GET_CONFIG from what was seen.
    pub fn answer(&self, get: &Message) -> Result<(Message, Answer), ConfigError> {
        let a = parse(&get.payload)?;
        let range = a.offset..a.offset + a.size;
        let answer = if self.known[range.clone()].iter().all(|&k| k) {
            Answer::Known
        } else {
            Answer::PartlyUnknown
        };
        let mut payload = Vec::with_capacity(HEADER + a.size);
        payload.extend_from_slice(&(a.offset as u32).to_le_bytes());
        payload.extend_from_slice(&(a.size as u32).to_le_bytes());
        payload.extend_from_slice(&a.flags.to_le_bytes());
        payload.extend_from_slice(&self.bytes[range]);
        let reply = Message::new(request::GET_CONFIG, FLAG_VERSION_1 | FLAG_REPLY, payload);
        Ok((reply, answer))
    }

    /// The frontend went away: the next one starts from nothing.
    pub fn clear(&mut self) {
        *self = ConfigSpace::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(offset: u32, data: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend_from_slice(&(data.len() as u32).to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(data);
        p
    }

    fn get(offset: u32, size: usize) -> Message {
        Message::new(
            request::GET_CONFIG,
            FLAG_VERSION_1,
            access(offset, &vec![0; size]),
        )
    }

    #[test]
    fn a_read_is_answered_with_what_the_backend_and_the_driver_last_said() {
        let mut space = ConfigSpace::default();
        // The backend's reply: num_pages 0x40000, actual 0x100.
        space.learn(&access(0, &[0, 0, 4, 0, 0, 1, 0, 0])).unwrap();
        // The driver writes actual.
        space.learn(&access(4, &[0, 2, 0, 0])).unwrap();
        let (reply, how) = space.answer(&get(0, 8)).unwrap();
        assert_eq!(how, Answer::Known);
        assert_eq!(reply.request, request::GET_CONFIG);
        assert_ne!(reply.flags & FLAG_REPLY, 0);
        assert_eq!(reply.payload, access(0, &[0, 0, 4, 0, 0, 2, 0, 0]));
        // A read of a part of it.
        let (reply, _) = space.answer(&get(4, 4)).unwrap();
        assert_eq!(reply.payload, access(4, &[0, 2, 0, 0]));
    }

    #[test]
    fn bytes_never_seen_read_as_zeros_and_say_so() {
        let mut space = ConfigSpace::default();
        space.learn(&access(0, &[7, 7, 7, 7])).unwrap();
        let (reply, how) = space.answer(&get(2, 4)).unwrap();
        assert_eq!(how, Answer::PartlyUnknown);
        assert_eq!(reply.payload, access(2, &[7, 7, 0, 0]));
        space.clear();
        assert_eq!(space.answer(&get(0, 4)).unwrap().1, Answer::PartlyUnknown);
    }

    #[test]
    fn accesses_outside_the_space_or_with_the_wrong_length_change_nothing() {
        let mut space = ConfigSpace::default();
        space.learn(&access(0, &[1; 8])).unwrap();
        assert_eq!(space.learn(&[0; 5]), Err(ConfigError::Short(5)));
        assert!(matches!(
            space.learn(&access(SPACE as u32 - 2, &[9; 4])),
            Err(ConfigError::OutOfRange { .. })
        ));
        assert!(matches!(
            space.learn(&access(u32::MAX, &[9; 4])),
            Err(ConfigError::OutOfRange { .. })
        ));
        assert!(matches!(
            space.learn(&access(0, &[])),
            Err(ConfigError::OutOfRange { .. })
        ));
        let mut lying = access(0, &[9; 4]);
        lying[4] = 8;
        assert_eq!(
            space.learn(&lying),
            Err(ConfigError::SizeMismatch {
                size: 8,
                carried: 4
            })
        );
        assert!(space.answer(&get(u32::MAX - 1, 4)).is_err());
        assert_eq!(
            space.answer(&get(0, 8)).unwrap().0.payload,
            access(0, &[1; 8])
        );
    }
}
