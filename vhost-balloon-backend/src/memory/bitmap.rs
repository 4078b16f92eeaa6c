//! One bit per 4 KiB page of a guest memory region: which pages the balloon holds. The words
//! live in this process's memory, or in a shared mapping of a file (see persist.rs), where every
//! update survives the process being killed.

use super::persist::MappedWords;

#[derive(Debug)]
enum Words {
    Owned(Vec<u64>),
    Mapped(MappedWords),
}

impl Words {
    fn as_slice(&self) -> &[u64] {
        match self {
            Words::Owned(v) => v,
            Words::Mapped(m) => m.as_slice(),
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u64] {
        match self {
            Words::Owned(v) => v,
            Words::Mapped(m) => m.as_mut_slice(),
        }
    }
}

impl Default for Words {
    fn default() -> Self {
        Words::Owned(Vec::new())
    }
}

#[derive(Debug, Default)]
pub struct PageBitmap {
    words: Words,
    pages: u64,
    set: u64,
}

/// Words needed for `pages` bits.
pub fn words_for(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

impl PageBitmap {
    pub fn new(pages: u64) -> Self {
        PageBitmap {
            words: Words::Owned(vec![0; words_for(pages)]),
            pages,
            set: 0,
        }
    }

    /// The words, for copying into a file.
    pub fn words(&self) -> &[u64] {
        self.words.as_slice()
    }

    /// Uses `mapped` (which holds `words_for(pages)` words, the bits to use from now on) as
    /// the storage.
    pub fn move_to(&mut self, mut mapped: MappedWords) {
        let slice = mapped.as_mut_slice();
        // persist::open sizes each region's words from this bitmap's own.
        debug_assert_eq!(slice.len(), words_for(self.pages));
        // Bits past the last page are never set, whatever a file held.
        if let (Some(last), rem) = (slice.last_mut(), self.pages % 64) {
            if rem != 0 {
                *last &= (1u64 << rem) - 1;
            }
        }
        self.set = slice.iter().map(|w| u64::from(w.count_ones())).sum();
        self.words = Words::Mapped(mapped);
    }

    /// Clears every bit, in place (a mapped bitmap stays mapped).
    pub fn clear_all(&mut self) {
        self.words.as_mut_slice().fill(0);
        self.set = 0;
    }

    /// Pages whose bit is set.
    pub fn count(&self) -> u64 {
        self.set
    }

    pub fn get(&self, page: u64) -> bool {
        page < self.pages && self.words.as_slice()[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Sets `count` bits from `start`; returns how many were newly set.
    pub fn set_range(&mut self, start: u64, count: u64) -> u64 {
        self.update(start, count, true)
    }

    /// Clears `count` bits from `start`; returns how many were set before.
    pub fn clear_range(&mut self, start: u64, count: u64) -> u64 {
        self.update(start, count, false)
    }

    /// Whether every bit in the range is set.
    pub fn all_set(&self, start: u64, count: u64) -> bool {
        (start..start + count).all(|p| self.get(p))
    }

    /// How many bits in the range are set (word at a time).
    pub fn count_range(&self, start: u64, count: u64) -> u64 {
        let words = self.words.as_slice();
        word_masks(self.pages, start, count)
            .map(|(w, mask)| u64::from((words[w] & mask).count_ones()))
            .sum()
    }

    fn update(&mut self, start: u64, count: u64, value: bool) -> u64 {
        let words = self.words.as_mut_slice();
        let mut changed = 0;
        for (word, mask) in word_masks(self.pages, start, count) {
            let before = words[word];
            let after = if value { before | mask } else { before & !mask };
            changed += u64::from((before ^ after).count_ones());
            words[word] = after;
        }
        if value {
            self.set += changed;
        } else {
            self.set -= changed;
        }
        changed
    }

    /// Runs of set bits as (start, count), in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut page = 0;
        while let Some(start) = self.next_set(page) {
            page = self.next_clear(start);
            runs.push((start, page - start));
        }
        runs
    }

    /// The first set bit at or after `from`, a word at a time.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        self.next_with(from, |w| w)
            .filter(|&page| page < self.pages)
    }

    /// The first clear bit at or after `from`, or the bitmap's length when there is none.
    pub fn next_clear(&self, from: u64) -> u64 {
        self.next_with(from, |w| !w)
            .map_or(self.pages, |page| page.min(self.pages))
    }

    /// The first bit at or after `from` that `view` (identity or inversion) shows set.
    fn next_with(&self, from: u64, view: impl Fn(u64) -> u64) -> Option<u64> {
        let words = self.words.as_slice();
        let mut index = (from / 64) as usize;
        let mut word = view(*words.get(index)?) & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                return Some(index as u64 * 64 + u64::from(word.trailing_zeros()));
            }
            index += 1;
            word = view(*words.get(index)?);
        }
    }
}

/// The words of a bitmap of `pages` bits that the pages `[start, start + count)` touch, with the
/// mask of their bits in each.
fn word_masks(pages: u64, start: u64, count: u64) -> impl Iterator<Item = (usize, u64)> {
    let end = start.saturating_add(count).min(pages);
    let mut page = start;
    std::iter::from_fn(move || {
        if page >= end {
            return None;
        }
        let first = page % 64;
        let n = (64 - first).min(end - page);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << first
        };
        let word = (page / 64) as usize;
        page += n;
        Some((word, mask))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_count_across_words() {
        let mut b = PageBitmap::new(200);
        assert_eq!(b.set_range(60, 10), 10);
        assert_eq!(b.set_range(65, 10), 5);
        assert_eq!(b.count(), 15);
        assert_eq!(b.count_range(0, 200), 15);
        assert_eq!(b.count_range(62, 70), 13);
        assert_eq!(b.count_range(70, 0), 0);
        assert_eq!(b.count_range(190, u64::MAX), 0);
        assert!(b.all_set(60, 15));
        assert!(!b.all_set(59, 2));
        assert_eq!(b.clear_range(0, 64), 4);
        assert_eq!(b.count(), 11);
        assert_eq!(b.set_range(0, 1000), 189);
        assert_eq!(b.count(), 200);
        assert_eq!(b.runs(), vec![(0, 200)]);
        assert_eq!(b.clear_range(100, u64::MAX), 100);
        assert_eq!(b.set_range(500, 5), 0);
        assert!(!b.get(500));
        assert_eq!(b.runs(), vec![(0, 100)]);
    }

    #[test]
    fn next_set_and_clear_scan_across_words() {
        let mut b = PageBitmap::new(200);
        assert_eq!(b.next_set(0), None);
        assert_eq!(b.next_clear(0), 0);
        b.set_range(70, 60);
        b.set_range(199, 1);
        assert_eq!(b.next_set(0), Some(70));
        assert_eq!(b.next_set(70), Some(70));
        assert_eq!(b.next_set(100), Some(100));
        assert_eq!(b.next_set(130), Some(199));
        assert_eq!(b.next_set(200), None);
        assert_eq!(b.next_clear(70), 130);
        assert_eq!(b.next_clear(199), 200);
        assert_eq!(b.next_clear(500), 200);
        assert_eq!(b.runs(), vec![(70, 60), (199, 1)]);
        b.set_range(0, 200);
        assert_eq!(b.next_clear(0), 200);
        assert_eq!(b.runs(), vec![(0, 200)]);
    }
}
