//! The library's line rule, on what a read found finished at its end: the newest finished frame
//! (epoch, then sequence) whose line holds together, followed back through the parents each
//! frame names until every shard has its latest snapshot, or the first checkpoint, or (resuming)
//! the local head, is reached. A frame of a lower epoch counts only as such an ancestor.
//!
//! A seed cut short is not a line: a candidate head that is a base frame (of a seed, see
//! [`FrameHeader::base_frames`]) counts only when every base frame up to the seed's last is
//! finished. Otherwise the rule passes over it as over an unfinished frame (it is neither a line
//! nor damage to report) and falls back to the previous line, or to nothing: a seed cut short
//! restores as if it had not been sent.

use std::collections::BTreeMap;

use crate::frame::FrameHeader;
use crate::ids::{FrameId, Sequence};

/// The frames a restore must have applied, oldest first, and what they build on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    /// Oldest first; the last is the head.
    pub(crate) frames: Vec<FrameId>,
    /// Each shard's latest snapshot on the line; `None` for a shard the frames do not
    /// snapshot, which keeps what the line builds on (empty, or the local head's).
    pub(crate) snapshot_sequences: Vec<Option<Sequence>>,
    /// Every shard is snapshotted on the line, so it builds on nothing: applied on any state,
    /// its frames leave the same one.
    pub(crate) covered: bool,
    /// The parent its first frame names: what it builds on when not covered (the empty state,
    /// or the local head a resumed read builds on).
    pub(crate) builds_on: FrameId,
}

/// Following one candidate head back.
pub(crate) enum Walk {
    Line(Line),
    /// A frame the line needs is not finished (damaged, unfinished, tombstoned).
    Broken,
    /// The head is a base frame of a seed that did not finish: not the seed's last, or a base
    /// frame before it is missing. Not a line, and not damage either.
    SeedCutShort,
    /// The line goes back past what a resumed read saw: whether it holds together is not known.
    LeavesRead,
}

/// The line ending at `head`, through `finished`. `base` is the local head a resumed read builds
/// on (`None` for a read of the whole log); `seen` says whether a read saw any record of a frame.
pub(crate) fn walk(
    shards: usize,
    finished: &BTreeMap<FrameId, &FrameHeader>,
    head: FrameId,
    base: Option<FrameId>,
    seen: impl Fn(FrameId) -> bool,
) -> Walk {
    let mut snapshot_sequences: Vec<Option<Sequence>> = vec![None; shards];
    let mut uncovered = shards;
    let mut frames = Vec::new();
    // Only a seed's own frames name base frames: a head past them (a later checkpoint) builds on
    // a seed that finished, since its writer sent nothing after a seed it did not finish.
    let head_is_base = finished.get(&head).is_some_and(|header| header.is_base());
    if finished
        .get(&head)
        .is_some_and(|header| header.is_seed_cut_short())
    {
        return Walk::SeedCutShort;
    }
    let mut id = head;
    let builds_on = loop {
        let Some(header) = finished.get(&id) else {
            // Going back past the read comes first: the frames read may not show a seed whole
            // that is, so only a restore of the whole log can tell.
            return if base.is_some() && !seen(id) {
                Walk::LeavesRead
            } else if head_is_base {
                // A base frame is missing behind the seed's last (one record of it lost, the
                // rest landed): the seed did not finish.
                Walk::SeedCutShort
            } else {
                Walk::Broken
            };
        };
        if header.base_frames > head.sequence.0 {
            // A base frame of a seed longer than this line: a line can only end on or past its
            // seed's last frame, so this one is not whole (never written so by this library).
            return Walk::Broken;
        }
        frames.push(id);
        for shard in &header.snapshot_shards {
            let latest = &mut snapshot_sequences[shard.index()];
            if latest.is_none() {
                *latest = Some(id.sequence);
                uncovered -= 1;
            }
        }
        let parent = header.parent();
        if uncovered == 0 || id.sequence == Sequence(1) || Some(parent) == base {
            break parent;
        }
        id = parent;
    };
    frames.reverse();
    Walk::Line(Line {
        frames,
        snapshot_sequences,
        covered: uncovered == 0,
        builds_on,
    })
}

/// What the rule picked.
pub(crate) enum Picked {
    /// The line, and how many finished frames newer than its head could not be used.
    Line { line: Line, newer_unusable: u64 },
    /// No finished frame past the base: nothing to apply.
    Nothing,
    /// Finished frames, none with a line that holds together.
    Broken { newest: FrameId, unusable: u64 },
    /// (Resuming) the newest line goes back past the read.
    LeavesRead { newest: FrameId },
}

/// The newest line among `finished`, or, resuming from `base`, among the frames newer than it.
/// Heads of seeds cut short are passed over uncounted, as unfinished frames are.
pub(crate) fn pick_line(
    shards: usize,
    finished: &BTreeMap<FrameId, &FrameHeader>,
    base: Option<FrameId>,
    seen: impl Fn(FrameId) -> bool,
) -> Picked {
    let floor = base.unwrap_or(FrameId::EMPTY);
    let candidates = finished.keys().rev().take_while(|id| **id > floor);
    let mut newest = None;
    let mut unusable = 0;
    for head in candidates {
        match walk(shards, finished, *head, base, &seen) {
            Walk::Line(line) => {
                return Picked::Line {
                    line,
                    newer_unusable: unusable,
                }
            }
            Walk::Broken => {
                newest = newest.or(Some(*head));
                unusable += 1;
            }
            Walk::SeedCutShort => {}
            Walk::LeavesRead => return Picked::LeavesRead { newest: *head },
        }
    }
    match newest {
        None => Picked::Nothing,
        Some(newest) => Picked::Broken { newest, unusable },
    }
}
