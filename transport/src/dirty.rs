//! Pages the source's guest writes while it still runs there (pre-copy).
//!
//! In a hybrid migration the guest keeps running at the source while the
//! destination copies its memory in rounds. The source tracks which pages
//! the guest writes (a [`DirtyLog`], for example userfaultfd
//! write-protection) and the destination asks, once per round, which
//! pages were written since the round before; the last ask also pauses the
//! guest. The transport carries the answer as a [`PageSet`]; it neither
//! knows nor cares how the pages were tracked.

use std::io;
use std::sync::{Arc, Mutex};

/// A set of pages, as a bitmap over a layout's global page numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    pages: u64,
}

impl PageSet {
    /// The empty set over `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// Builds a set from its wire words; `words` must be exactly
    /// `ceil(pages / 64)` long and name no page at or past `pages`.
    pub fn from_words(words: Vec<u64>, pages: u64) -> Option<Self> {
        if words.len() as u64 != pages.div_ceil(64) {
            return None;
        }
        let tail = pages % 64;
        if tail != 0 && words.last().is_some_and(|w| w >> tail != 0) {
            return None;
        }
        Some(Self { words, pages })
    }

    /// The wire words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Pages the set is over.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Adds `page` (ignored when out of range).
    pub fn insert(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Whether `page` is in the set (false when out of range).
    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Adds every page of `other`, a set over as many pages.
    pub fn union_with(&mut self, other: &PageSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// The pages in the set, in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let bit = u64::from(w.trailing_zeros());
                    w &= w - 1;
                    i as u64 * 64 + bit
                })
            })
        })
    }
}

/// What tracks the source guest's writes. Implemented where the guest's
/// memory is (userfaultfd write-protection in `pagewire-engine`, or a
/// VMM's own dirty log).
pub trait DirtyLog: Send + Sync {
    /// Pages written since the last call (or since tracking began), and
    /// tracking goes on for the next call. With `pause`, the guest is first
    /// paused for good (the switch-over): the answer is then the last one,
    /// and nothing is written after it.
    fn collect(&self, pause: bool) -> io::Result<PageSet>;
}

/// Numbered pre-copy rounds over a [`DirtyLog`], safe to ask again.
///
/// Round `n + 1` answers what was written since round `n`. A destination
/// whose connection dropped before round `n`'s answer arrived asks for
/// round `n` again: it then gets round `n`'s answer plus everything
/// written since, so no write is ever lost to a lost reply.
pub struct DirtyRounds {
    log: Arc<dyn DirtyLog>,
    /// The last round answered, and whether it paused the guest.
    last: Mutex<Option<(u32, PageSet, bool)>>,
    /// Every page any round found written (since tracking began).
    written: Mutex<Option<PageSet>>,
}

impl std::fmt::Debug for DirtyRounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyRounds").finish_non_exhaustive()
    }
}

/// Why a round could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The round is neither the last one again nor the next.
    #[error("pre-copy round {asked} asked after round {last:?}")]
    Round {
        /// The round asked for.
        asked: u32,
        /// The last round answered.
        last: Option<u32>,
    },
    /// The dirty log failed.
    #[error("dirty log: {0}")]
    Log(#[from] io::Error),
    /// The source tracks no writes: its guest does not run there.
    #[error("this source does not track guest writes (no pre-copy)")]
    Unsupported,
    /// The guest was paused by an earlier switch-over: the memory no
    /// longer changes, a new destination migrates it as static memory.
    #[error("the guest at this source is paused (switched over): its memory is static")]
    Paused,
}

impl DirtyError {
    /// The code a source answers with. Only "no pre-copy here" (no
    /// tracking, or a paused guest) is `Unsupported`: a destination takes
    /// that for static memory and migrates without a switch-over, which
    /// must never happen to a running guest.
    pub fn remote_code(&self) -> crate::error::RemoteCode {
        match self {
            Self::Unsupported | Self::Paused => crate::error::RemoteCode::Unsupported,
            Self::Round { .. } | Self::Log(_) => crate::error::RemoteCode::Other,
        }
    }
}

impl DirtyRounds {
    /// Rounds over `log`; the first round asked must be 1.
    pub fn new(log: Arc<dyn DirtyLog>) -> Self {
        Self {
            log,
            last: Mutex::new(None),
            written: Mutex::new(None),
        }
    }

    /// Every page a round answered so far found written, or `None`
    /// before the first round. Once the guest is paused this is every page
    /// written since tracking began.
    pub fn written(&self) -> Option<PageSet> {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Answers round `round` (see the type's documentation).
    pub fn round(&self, round: u32, pause: bool) -> Result<PageSet, DirtyError> {
        // A poisoned lock means a panic mid-round; the stored answer is
        // still a valid set (it is replaced whole), so keep going.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let prev = last.as_ref().map(|(n, _, _)| *n);
        let again = prev == Some(round);
        if !again && last.as_ref().is_some_and(|(_, _, paused)| *paused) {
            return Err(DirtyError::Paused);
        }
        if !again && round != prev.map_or(1, |n| n.wrapping_add(1)) {
            return Err(DirtyError::Round {
                asked: round,
                last: prev,
            });
        }
        let mut set = self.log.collect(pause)?;
        let mut paused = pause;
        if again {
            if let Some((_, before, was_paused)) = last.as_ref() {
                if before.pages() == set.pages() {
                    set.union_with(before);
                }
                paused |= *was_paused;
            }
        }
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        match written.as_mut() {
            Some(w) if w.pages() == set.pages() => w.union_with(&set),
            _ => *written = Some(set.clone()),
        }
        *last = Some((round, set.clone(), paused));
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sets_round_trip_and_reject_bad_words() {
        let mut s = PageSet::new(130);
        for p in [0, 63, 64, 129, 130, 500] {
            s.insert(p);
        }
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        assert_eq!(s.count(), 4);
        assert!(s.contains(129) && !s.contains(130) && !s.contains(1));
        let back = PageSet::from_words(s.words().to_vec(), 130).unwrap();
        assert_eq!(back, s);
        assert!(PageSet::from_words(vec![0; 2], 130).is_none());
        assert!(PageSet::from_words(vec![0, 0, 1 << 2], 130).is_none());
        assert!(PageSet::from_words(vec![0, 0, 1 << 1], 130).is_some());
    }

    struct Scripted(Mutex<Vec<Vec<u64>>>);

    impl DirtyLog for Scripted {
        fn collect(&self, _pause: bool) -> io::Result<PageSet> {
            let mut s = PageSet::new(100);
            for p in self.0.lock().unwrap().remove(0) {
                s.insert(p);
            }
            Ok(s)
        }
    }

    #[test]
    fn asking_a_round_again_loses_no_write() {
        let log = Scripted(Mutex::new(vec![vec![1, 2], vec![3], vec![4], vec![]]));
        // (The second ask of round 2 consumes the empty answer.)
        let r = DirtyRounds::new(Arc::new(log));
        assert!(matches!(r.round(2, false), Err(DirtyError::Round { .. })));
        assert_eq!(
            r.round(1, false).unwrap().iter().collect::<Vec<_>>(),
            [1, 2]
        );
        // The reply to round 1 was lost: round 1 again has its pages too.
        let again = r.round(1, false).unwrap();
        assert_eq!(again.iter().collect::<Vec<_>>(), [1, 2, 3]);
        assert!(matches!(r.round(5, false), Err(DirtyError::Round { .. })));
        assert_eq!(r.round(2, true).unwrap().iter().collect::<Vec<_>>(), [4]);
        // The switch-over's answer lost: asked again, it comes again.
        assert_eq!(r.round(2, true).unwrap().iter().collect::<Vec<_>>(), [4]);
        // After it, the memory is static: no more rounds.
        assert!(matches!(r.round(3, false), Err(DirtyError::Paused)));
        assert!(matches!(r.round(1, true), Err(DirtyError::Paused)));
        let all = r.written().unwrap();
        assert_eq!(all.iter().collect::<Vec<_>>(), [1, 2, 3, 4]);
    }
}
