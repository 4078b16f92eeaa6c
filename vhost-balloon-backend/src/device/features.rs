//! Feature bits (virtio spec 5.5.3; Linux include/uapi/linux/virtio_balloon.h).

/// The host must be told before a deflated page is used. Offered: our deflate handling is
/// synchronous, so the driver's deflate request is acknowledged only after tracking is updated.
pub const MUST_TELL_HOST: u32 = 0;
pub const STATS_VQ: u32 = 1;
pub const DEFLATE_ON_OOM: u32 = 2;
/// Free page hinting serves live migration (the migration code skips hinted pages); a vhost-user
/// device does not take part in QEMU's migration, so it is not offered.
pub const FREE_PAGE_HINT: u32 = 3;
/// With PAGE_POISON the device must keep the guest's poison pattern in pages it reports as free;
/// discarding refills them with zeros, so it is not offered. Linux then turns free page
/// reporting off on guests that poison free pages, which is the safe outcome.
pub const PAGE_POISON: u32 = 4;
pub const REPORTING: u32 = 5;

pub const VIRTIO_F_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// vhost-user: the backend speaks the protocol-feature negotiation.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// vhost's dirty-page logging (VHOST_F_LOG_ALL): set by the frontend while it migrates the VM,
/// so that every page the backend writes is marked in the log it gave (SET_LOG_BASE).
pub const VHOST_F_LOG_ALL: u32 = 26;

pub const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// Which optional device features the operator lets the backend offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureChoice {
    pub stats: bool,
    pub deflate_on_oom: bool,
    pub free_page_reporting: bool,
}

impl Default for FeatureChoice {
    fn default() -> Self {
        FeatureChoice {
            stats: true,
            deflate_on_oom: true,
            free_page_reporting: true,
        }
    }
}

impl FeatureChoice {
    /// The virtio feature bits the device offers.
    pub fn offered(self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_F_RING_EVENT_IDX)
            | bit(VIRTIO_F_INDIRECT_DESC)
            | bit(VHOST_USER_F_PROTOCOL_FEATURES)
            | bit(MUST_TELL_HOST);
        if self.stats {
            f |= bit(STATS_VQ);
        }
        if self.deflate_on_oom {
            f |= bit(DEFLATE_ON_OOM);
        }
        if self.free_page_reporting {
            f |= bit(REPORTING);
        }
        f
    }
}

const NAMES: &[(u32, &str)] = &[
    (MUST_TELL_HOST, "MUST_TELL_HOST"),
    (STATS_VQ, "STATS_VQ"),
    (DEFLATE_ON_OOM, "DEFLATE_ON_OOM"),
    (FREE_PAGE_HINT, "FREE_PAGE_HINT"),
    (PAGE_POISON, "PAGE_POISON"),
    (REPORTING, "REPORTING"),
    (VIRTIO_F_INDIRECT_DESC, "INDIRECT_DESC"),
    (VIRTIO_F_RING_EVENT_IDX, "RING_EVENT_IDX"),
    (VHOST_USER_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
    (VHOST_F_LOG_ALL, "LOG_ALL"),
    (VIRTIO_F_VERSION_1, "VERSION_1"),
];

/// The device-type bits of a feature set (0 to 23; the rest are the transport's).
pub fn device_features(features: u64) -> u64 {
    features & ((1 << 24) - 1)
}

/// Names of the set bits, for status output; unknown bits as `bit N`.
pub fn names(features: u64) -> Vec<String> {
    (0..64)
        .filter(|b| features & (1u64 << b) != 0)
        .map(|b| {
            NAMES
                .iter()
                .find(|(n, _)| *n == b)
                .map(|(_, name)| name.to_string())
                .unwrap_or_else(|| format!("bit {b}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_offers_what_is_not_implemented() {
        let all = FeatureChoice::default().offered();
        assert_eq!(all & bit(FREE_PAGE_HINT), 0);
        assert_eq!(all & bit(PAGE_POISON), 0);
        assert_ne!(all & bit(VIRTIO_F_VERSION_1), 0);
        let none = FeatureChoice {
            stats: false,
            deflate_on_oom: false,
            free_page_reporting: false,
        }
        .offered();
        assert_eq!(
            none & (bit(STATS_VQ) | bit(DEFLATE_ON_OOM) | bit(REPORTING)),
            0
        );
    }

    #[test]
    fn feature_names() {
        assert_eq!(
            names(bit(STATS_VQ) | bit(VIRTIO_F_VERSION_1) | bit(40)),
            vec!["STATS_VQ", "VERSION_1", "bit 40"]
        );
    }
}
