//! Which llama.cpp sequence serves which conversation.
//!
//! There are `parallel` sequences ("slots", as llama-server calls them). A slot remembers the
//! tokens whose KV it holds, so a later prompt that starts the same way only evaluates the rest.
//! This file is pure bookkeeping; `worker.rs` does the llama.cpp calls it implies.

use uuid::Uuid;

/// One llama.cpp sequence and what it holds.
#[derive(Debug)]
pub(super) struct Slot {
    pub seq_id: i32,
    /// The conversation this sequence's cache belongs to; `None` for anonymous prompt caching.
    pub session: Option<Uuid>,
    /// Tokens whose KV is in the sequence, at positions `0..cached.len()`.
    pub cached: Vec<i32>,
    /// Logical clock of the last time a request finished here: least recently used goes first.
    pub last_used: u64,
    /// Whether a request is running here.
    pub busy: bool,
    /// blake3 of the API key that owns the conversation; `None` for nobody.
    pub owner: Option<String>,
    pub created_ms: u64,
    pub last_used_ms: u64,
    /// The sequence changed since the conversation was last saved.
    pub dirty: bool,
    /// Positions `0..saved_prefix` hold the same KV as the last save handed to the keeper
    /// (nothing there was trimmed or decoded again since), so that save's pages for them can
    /// be taken as they are. Lowered by every trim, zeroed by every clear and failed save.
    pub saved_prefix: usize,
}

impl Slot {
    pub fn new(seq_id: i32) -> Self {
        Self {
            seq_id,
            session: None,
            cached: Vec::new(),
            last_used: 0,
            busy: false,
            owner: None,
            created_ms: 0,
            last_used_ms: 0,
            dirty: false,
            saved_prefix: 0,
        }
    }
}

/// Where a request should run.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Placement {
    /// Run in this slot.
    Slot(usize),
    /// The conversation's own slot is busy with its previous turn, or every slot is busy.
    Wait,
}

/// Chooses the slot for a request of `session` (if any) whose prompt is `prompt`.
///
/// A conversation always returns to the slot that holds its cache. Otherwise the request takes
/// an idle slot that belongs to no conversation, preferring the one whose cache shares the longest
/// prefix with the prompt, then the least recently used; only when none is left does it take the
/// least recently used idle conversation's slot (evicting that cache).
pub(super) fn place(slots: &[Slot], session: Option<Uuid>, prompt: &[i32]) -> Placement {
    if let Some(id) = session
        && let Some(index) = slots.iter().position(|s| s.session == Some(id))
    {
        return if slots[index].busy {
            Placement::Wait
        } else {
            Placement::Slot(index)
        };
    }
    let anonymous = slots
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.busy && s.session.is_none())
        .max_by_key(|(_, s)| {
            (
                common_prefix(&s.cached, prompt),
                std::cmp::Reverse(s.last_used),
            )
        });
    if let Some((index, _)) = anonymous {
        return Placement::Slot(index);
    }
    slots
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.busy)
        .min_by_key(|(_, s)| s.last_used)
        .map_or(Placement::Wait, |(index, _)| Placement::Slot(index))
}

/// How many leading tokens two sequences share.
pub(super) fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(seq: i32, session: Option<Uuid>, cached: &[i32], last_used: u64) -> Slot {
        Slot {
            cached: cached.to_vec(),
            last_used,
            session,
            ..Slot::new(seq)
        }
    }

    #[test]
    fn a_conversation_returns_to_its_slot_or_waits_for_it() {
        let id = Uuid::new_v4();
        let mut slots = vec![slot(0, None, &[], 0), slot(1, Some(id), &[1, 2], 5)];
        assert_eq!(place(&slots, Some(id), &[9]), Placement::Slot(1));
        slots[1].busy = true;
        assert_eq!(place(&slots, Some(id), &[9]), Placement::Wait);
    }

    #[test]
    fn anonymous_prompts_prefer_the_longest_shared_prefix() {
        let slots = vec![slot(0, None, &[1, 9], 1), slot(1, None, &[1, 2, 3], 2)];
        assert_eq!(place(&slots, None, &[1, 2, 4]), Placement::Slot(1));
    }

    #[test]
    fn conversations_are_evicted_least_recently_used_first() {
        let a = Uuid::new_v4();
        let b = Uuid::new_v4();
        let slots = vec![slot(0, Some(a), &[1], 9), slot(1, Some(b), &[1], 3)];
        assert_eq!(
            place(&slots, Some(Uuid::new_v4()), &[1]),
            Placement::Slot(1)
        );
    }
}
