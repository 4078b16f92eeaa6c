//! The device's config space (struct virtio_balloon_config, little endian):
//! `num_pages` (offset 0, the target, written by the device) and `actual` (offset 4, written by
//! the driver). The free-page-hint and poison fields follow only with features not offered, so
//! the config is 8 bytes.

pub const CONFIG_SIZE: usize = 8;
const ACTUAL: std::ops::Range<usize> = 4..8;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Balloon size the device asks for, in 4 KiB pages.
    pub num_pages: u32,
    /// Balloon size the driver reports, in 4 KiB pages.
    pub actual: u32,
}

impl BalloonConfig {
    pub fn to_bytes(self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        b[ACTUAL].copy_from_slice(&self.actual.to_le_bytes());
        b
    }

    /// A config read (GET_CONFIG): the bytes at `offset..offset+size` that exist; reads past
    /// the end get zeros, as from a register that is not there.
    pub fn read(self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        (offset as u64..offset as u64 + size as u64)
            .map(|i| bytes.get(i as usize).copied().unwrap_or(0))
            .collect()
    }

    /// A config write (SET_CONFIG) from the driver. Only `actual` is the driver's to write;
    /// QEMU forwards writes as the whole config from offset 0, whose `num_pages` may be stale
    /// (read before the last target change), so that field is never taken from a write. Bytes
    /// outside the config are ignored. Returns whether `actual` changed.
    pub fn write(&mut self, offset: u32, data: &[u8]) -> bool {
        let mut actual = self.actual.to_le_bytes();
        for (i, byte) in data.iter().enumerate() {
            let Some(pos) = (offset as usize).checked_add(i) else {
                break;
            };
            if ACTUAL.contains(&pos) {
                actual[pos - ACTUAL.start] = *byte;
            }
        }
        let new = u32::from_le_bytes(actual);
        let changed = new != self.actual;
        self.actual = new;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_any_window() {
        let c = BalloonConfig {
            num_pages: 0x0102_0304,
            actual: 0x0a0b_0c0d,
        };
        assert_eq!(c.read(0, 8), vec![4, 3, 2, 1, 0xd, 0xc, 0xb, 0xa]);
        assert_eq!(c.read(4, 4), vec![0xd, 0xc, 0xb, 0xa]);
        assert_eq!(c.read(6, 4), vec![0xb, 0xa, 0, 0]);
        assert_eq!(c.read(u32::MAX, 2), vec![0, 0]);
    }

    #[test]
    fn writes_change_only_actual() {
        let mut c = BalloonConfig {
            num_pages: 100,
            actual: 0,
        };
        // QEMU's form: the whole config from offset 0, with a stale num_pages.
        let mut whole = BalloonConfig {
            num_pages: 7,
            actual: 42,
        }
        .to_bytes()
        .to_vec();
        assert!(c.write(0, &whole));
        assert_eq!(
            c,
            BalloonConfig {
                num_pages: 100,
                actual: 42
            }
        );
        // The driver's own form: 4 bytes at offset 4.
        assert!(c.write(4, &43u32.to_le_bytes()));
        assert_eq!(c.actual, 43);
        assert!(!c.write(4, &43u32.to_le_bytes()));
        // Partial and out-of-range writes.
        c.write(5, &[1]);
        assert_eq!(c.actual, 43 | (1 << 8));
        whole.extend_from_slice(&[9; 100]);
        c.write(0, &whole);
        assert_eq!(c.actual, 42);
        assert!(!c.write(u32::MAX, &[1, 2, 3]));
        assert_eq!(c.num_pages, 100);
    }
}
