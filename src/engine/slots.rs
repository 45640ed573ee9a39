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
    /// For anonymous content, the key whose prompts the cache holds (`Requester::tenant`):
    /// only that key's requests may reuse its prefix, or see how much of it matched.
    pub tenant: Option<String>,
    pub created_ms: u64,
    pub last_used_ms: u64,
    /// The sequence changed since the conversation was last saved.
    pub dirty: bool,
    /// Positions `0..saved_prefix` hold the same KV as the last save handed to the keeper
    /// (nothing there was trimmed or decoded again since), so that save's pages for them can
    /// be taken as they are. Lowered by every trim, zeroed by every clear and failed save.
    pub saved_prefix: usize,
    /// For anonymous content: the unnamed entry it was restored from or last kept as, whose
    /// pages `saved_prefix` speaks of.
    pub entry: Option<Uuid>,
    /// The sequence holds exactly a checkpoint entry just restored (`KeepAs::Entry`'s
    /// `checkpoint`): a turn that starts from all of it computes what a cold start would.
    pub checkpoint: bool,
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
            tenant: None,
            created_ms: 0,
            last_used_ms: 0,
            dirty: false,
            saved_prefix: 0,
            entry: None,
            checkpoint: false,
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

/// Chooses the slot for a request of `session` (if any) whose prompt is `prompt`, sent with
/// the key of `tenant`.
///
/// A conversation always returns to the slot that holds its cache. Otherwise the request takes
/// an idle slot that belongs to no conversation, preferring the one whose cache (of its own
/// key) shares the longest prefix with the prompt, then the least recently used; only when none
/// is left does it take the least recently used idle conversation's slot (evicting that cache).
pub(super) fn place(
    slots: &[Slot],
    session: Option<Uuid>,
    tenant: &Option<String>,
    prompt: &[i32],
) -> Placement {
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
            let shared = if &s.tenant == tenant {
                common_prefix(&s.cached, prompt)
            } else {
                0
            };
            (shared, std::cmp::Reverse(s.last_used))
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

/// How much of a sequence holding `cached` a prompt that names no conversation may keep: all
/// of it when the prompt continues it; when the prompt is one the sequence holds with a reply
/// after it (a resent or regenerated prompt), that prompt, but only while cutting the reply off
/// leaves the cache exactly as the prompt left it (no sliding-window cache, or one that never
/// filled: past it the reply's cells displaced others, `make batch-probe`); otherwise nothing.
pub(super) fn unnamed_reuse(cached: &[i32], prompt: &[i32], n_swa: usize) -> usize {
    let shared = common_prefix(cached, prompt);
    if shared == cached.len() || (shared == prompt.len() && (n_swa == 0 || cached.len() <= n_swa)) {
        shared
    } else {
        0
    }
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
        assert_eq!(place(&slots, Some(id), &None, &[9]), Placement::Slot(1));
        slots[1].busy = true;
        assert_eq!(place(&slots, Some(id), &None, &[9]), Placement::Wait);
    }

    #[test]
    fn anonymous_prompts_prefer_the_longest_shared_prefix() {
        let slots = vec![slot(0, None, &[1, 9], 1), slot(1, None, &[1, 2, 3], 2)];
        assert_eq!(place(&slots, None, &None, &[1, 2, 4]), Placement::Slot(1));
    }

    #[test]
    fn another_keys_cache_is_no_prefix() {
        let mut slots = vec![slot(0, None, &[1, 2, 3], 1), slot(1, None, &[7], 2)];
        slots[0].tenant = Some("a".into());
        slots[1].tenant = Some("b".into());
        // Key b's request shares nothing with key a's cache: it goes by age, not prefix.
        assert_eq!(
            place(&slots, None, &Some("b".into()), &[1, 2, 3, 4]),
            Placement::Slot(0)
        );
        slots[0].last_used = 3;
        assert_eq!(
            place(&slots, None, &Some("b".into()), &[1, 2, 3, 4]),
            Placement::Slot(1)
        );
        assert_eq!(
            place(&slots, None, &Some("a".into()), &[1, 2, 3, 4]),
            Placement::Slot(0)
        );
    }

    #[test]
    fn an_unnamed_prompt_keeps_all_of_a_sequence_or_a_resent_prompt_or_nothing() {
        // It continues the sequence: all of it.
        assert_eq!(unnamed_reuse(&[1, 2, 3], &[1, 2, 3, 4], 0), 3);
        // A shared beginning only: nothing.
        assert_eq!(unnamed_reuse(&[1, 2, 3], &[1, 2, 9], 0), 0);
        // A resent prompt whose reply the sequence holds: the prompt, unless a window cache
        // filled meanwhile.
        assert_eq!(unnamed_reuse(&[1, 2, 3, 7, 8], &[1, 2, 3], 0), 3);
        assert_eq!(unnamed_reuse(&[1, 2, 3, 7, 8], &[1, 2, 3], 8), 3);
        assert_eq!(unnamed_reuse(&[1, 2, 3, 7, 8], &[1, 2, 3], 4), 0);
    }

    #[test]
    fn conversations_are_evicted_least_recently_used_first() {
        let a = Uuid::new_v4();
        let b = Uuid::new_v4();
        let slots = vec![slot(0, Some(a), &[1], 9), slot(1, Some(b), &[1], 3)];
        assert_eq!(
            place(&slots, Some(Uuid::new_v4()), &None, &[1]),
            Placement::Slot(1)
        );
    }
}
