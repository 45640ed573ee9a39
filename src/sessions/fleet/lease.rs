//! The fleet's ownership rules as decisions on values, with no bucket: who serves a
//! conversation (`decide`, before anything reads it), and whether an upload may write over
//! the version the bucket holds (`may_write_over`). `mod.rs` asks the bucket and acts.

use crate::store::records::SessionRecord;
use crate::store::remote::{Lease, RemoteConversation};

/// What a claim does with a conversation the bucket holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Decision {
    /// Another instance holds a live lease: the client goes there (307).
    Elsewhere(String),
    /// The local copy is the bucket's, or newer: take the lease and keep it.
    Keep,
    /// The bucket's version is newer and a resident copy may be in use: drop that copy
    /// unsaved, then ask again to replace it.
    Stale,
    /// Fetch the bucket's version (every page checked), then take the lease.
    Fetch,
}

/// Decides a claim by instance `me` at `now_ms`, given the local record (if any) and the
/// bucket's object; `replace` once a resident copy was dropped after `Stale`.
///
/// A local copy stands when it is the bucket's version (same checksum), or when `me` wrote the
/// bucket's version and has saved at least as often since (a store restored from a backup has
/// fewer saves than what it wrote later: the bucket's copy is newer then). Any other local copy
/// is older than the bucket's.
pub(super) fn decide(
    me: u64,
    local: Option<&SessionRecord>,
    remote: &RemoteConversation,
    replace: bool,
    now_ms: u64,
) -> Decision {
    if let Some(lease) = &remote.lease
        && lease.instance != me
        && lease.expires_ms > now_ms
    {
        return Decision::Elsewhere(lease.url.clone());
    }
    let Some(local) = local else {
        return Decision::Fetch;
    };
    let same = local.checksum == remote.record.checksum;
    let mine = is_mine(me, remote.lease.as_ref());
    if same || (mine && local.saves >= remote.record.saves) {
        Decision::Keep
    } else if replace {
        Decision::Fetch
    } else {
        Decision::Stale
    }
}

/// Whether instance `me`, whose copy counts `saves`, may write over `found`, the version that
/// beat its conditional write: only its own, and only one with no more saves than its copy.
pub(super) fn may_write_over(me: u64, saves: u64, found: &RemoteConversation) -> bool {
    is_mine(me, found.lease.as_ref()) && found.record.saves <= saves
}

/// Whether `lease` names instance `me`.
pub(super) fn is_mine(me: u64, lease: Option<&Lease>) -> bool {
    lease.is_some_and(|l| l.instance == me)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::RECORD_VERSION;

    const ME: u64 = 1;
    const OTHER: u64 = 2;
    const NOW: u64 = 10_000;

    fn record(checksum: &str, saves: u64) -> SessionRecord {
        SessionRecord {
            record_version: RECORD_VERSION,
            owner: None,
            created_ms: 0,
            last_used_ms: 0,
            tokens: 1,
            bytes: 1,
            chunks: 0,
            checksum: checksum.into(),
            model: "m".into(),
            damaged: None,
            compute_profile: None,
            saves,
        }
    }

    fn remote(instance: u64, expires_ms: u64, checksum: &str, saves: u64) -> RemoteConversation {
        RemoteConversation {
            lease: Some(Lease {
                instance,
                url: format!("http://instance-{instance}"),
                epoch: 1,
                expires_ms,
            }),
            record: record(checksum, saves),
            manifest: Vec::new(),
            refs: Vec::new(),
        }
    }

    #[test]
    fn another_instances_live_lease_sends_the_client_there() {
        let held = remote(OTHER, NOW + 1, "b", 2);
        assert_eq!(
            decide(ME, Some(&record("a", 1)), &held, false, NOW),
            Decision::Elsewhere("http://instance-2".into())
        );
        assert_eq!(
            decide(ME, None, &held, true, NOW),
            Decision::Elsewhere("http://instance-2".into())
        );
    }

    #[test]
    fn without_a_local_copy_the_buckets_is_fetched() {
        assert_eq!(
            decide(ME, None, &remote(OTHER, NOW - 1, "b", 2), false, NOW),
            Decision::Fetch
        );
        assert_eq!(
            decide(ME, None, &remote(ME, NOW + 1, "b", 2), false, NOW),
            Decision::Fetch
        );
    }

    #[test]
    fn the_same_version_or_this_instances_newer_one_is_kept() {
        let expired = remote(OTHER, NOW - 1, "a", 3);
        assert_eq!(
            decide(ME, Some(&record("a", 3)), &expired, false, NOW),
            Decision::Keep
        );
        // Written here, then saved here again (not uploaded yet).
        let mine = remote(ME, NOW - 1, "a", 3);
        assert_eq!(
            decide(ME, Some(&record("b", 4)), &mine, false, NOW),
            Decision::Keep
        );
        // Own live lease: no redirect to itself.
        let live = remote(ME, NOW + 5, "a", 3);
        assert_eq!(
            decide(ME, Some(&record("a", 3)), &live, false, NOW),
            Decision::Keep
        );
    }

    #[test]
    fn an_older_copy_gives_way_after_its_resident_copy_is_dropped() {
        // Another instance continued it.
        let theirs = remote(OTHER, NOW - 1, "c", 5);
        assert_eq!(
            decide(ME, Some(&record("a", 3)), &theirs, false, NOW),
            Decision::Stale
        );
        assert_eq!(
            decide(ME, Some(&record("a", 3)), &theirs, true, NOW),
            Decision::Fetch
        );
        // This instance wrote the bucket's version, but its store was restored from a backup.
        let mine_newer = remote(ME, NOW - 1, "c", 5);
        assert_eq!(
            decide(ME, Some(&record("a", 3)), &mine_newer, false, NOW),
            Decision::Stale
        );
        assert_eq!(
            decide(ME, Some(&record("a", 3)), &mine_newer, true, NOW),
            Decision::Fetch
        );
    }

    #[test]
    fn an_upload_writes_over_only_its_own_version_with_no_more_saves() {
        assert!(may_write_over(ME, 4, &remote(ME, NOW, "a", 4)));
        assert!(may_write_over(ME, 4, &remote(ME, NOW, "a", 3)));
        assert!(
            !may_write_over(ME, 4, &remote(ME, NOW, "a", 5)),
            "restored from a backup"
        );
        assert!(
            !may_write_over(ME, 9, &remote(OTHER, NOW, "a", 1)),
            "another's"
        );
        let mut unleased = remote(ME, NOW, "a", 1);
        unleased.lease = None;
        assert!(!may_write_over(ME, 9, &unleased));
    }
}
