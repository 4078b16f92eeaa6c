//! Which virtqueue index carries what. The Linux driver (init_vqs) lists inflate, deflate,
//! stats, free page hint and reporting, leaving out the ones whose feature was not negotiated,
//! and virtio-pci numbers only the queues it really sets up: indices are compacted over the
//! negotiated features (verified: with REPORTING alone, reporting is queue 2). The spec's fixed
//! numbering (reporting = 4) is not what drivers do.

use super::features::{bit, FREE_PAGE_HINT, REPORTING, STATS_VQ};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    Inflate,
    Deflate,
    Stats,
    FreePageHint,
    Reporting,
}

/// The mapping from queue index to kind for one set of negotiated features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueLayout {
    kinds: Vec<QueueKind>,
}

impl QueueLayout {
    pub fn for_features(acked: u64) -> Self {
        let mut kinds = vec![QueueKind::Inflate, QueueKind::Deflate];
        if acked & bit(STATS_VQ) != 0 {
            kinds.push(QueueKind::Stats);
        }
        if acked & bit(FREE_PAGE_HINT) != 0 {
            kinds.push(QueueKind::FreePageHint);
        }
        if acked & bit(REPORTING) != 0 {
            kinds.push(QueueKind::Reporting);
        }
        QueueLayout { kinds }
    }

    pub fn kind(&self, index: usize) -> Option<QueueKind> {
        self.kinds.get(index).copied()
    }

    pub fn index(&self, kind: QueueKind) -> Option<usize> {
        self.kinds.iter().position(|k| *k == kind)
    }

    pub fn len(&self) -> usize {
        self.kinds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::features::DEFLATE_ON_OOM;

    #[test]
    fn indices_compact_over_negotiated_features() {
        let cases: &[(u64, &[QueueKind])] = &[
            (0, &[QueueKind::Inflate, QueueKind::Deflate]),
            (
                bit(DEFLATE_ON_OOM),
                &[QueueKind::Inflate, QueueKind::Deflate],
            ),
            (
                bit(REPORTING),
                &[QueueKind::Inflate, QueueKind::Deflate, QueueKind::Reporting],
            ),
            (
                bit(STATS_VQ) | bit(REPORTING),
                &[
                    QueueKind::Inflate,
                    QueueKind::Deflate,
                    QueueKind::Stats,
                    QueueKind::Reporting,
                ],
            ),
            (
                bit(STATS_VQ) | bit(FREE_PAGE_HINT) | bit(REPORTING),
                &[
                    QueueKind::Inflate,
                    QueueKind::Deflate,
                    QueueKind::Stats,
                    QueueKind::FreePageHint,
                    QueueKind::Reporting,
                ],
            ),
        ];
        for (features, kinds) in cases {
            let layout = QueueLayout::for_features(*features);
            assert_eq!(layout.len(), kinds.len());
            for (i, k) in kinds.iter().enumerate() {
                assert_eq!(layout.kind(i), Some(*k));
                assert_eq!(layout.index(*k), Some(i));
            }
            assert_eq!(layout.kind(kinds.len()), None);
        }
    }
}
