//! The claim made before anything reads a conversation here: another instance's live lease
//! sends the client there, an older local copy gives way to the bucket's, and this instance
//! takes the lease (the rules themselves are `lease.rs`).

use std::time::{Duration, Instant};

use uuid::Uuid;

use super::lease::{self, Decision};
use super::{Fleet, FleetError, blocking, unreachable};
use crate::clock::now_ms;
use crate::store::SessionStore;
use crate::store::records::AuditRecord;
use crate::store::remote::{Lease, RemoteConversation, RemoteWriteError};

/// What `claim` found.
pub enum Claim {
    /// The conversation can be served here (or does not exist anywhere).
    Here,
    /// Another instance continued it since this one last held it: this instance's resident
    /// copy must be dropped (unsaved) before `claim` is asked again with `replace`.
    Stale,
}

/// After a request found the bucket not answering, requests serve local copies without asking
/// it for this long.
const ASK_FAILED_BUCKET_AFTER: Duration = Duration::from_secs(10);

impl Fleet {
    /// Records in the audit trail that this instance took `session`'s lease from `previous`
    /// (expired, or absent in an object written before leases).
    async fn audit_takeover(&self, session: Uuid, previous: Option<&Lease>, epoch: u64) {
        let detail = match previous {
            Some(lease) => format!(
                "from instance {:016x} ({}), whose lease expired at {} ms; epoch {epoch}",
                lease.instance, lease.url, lease.expires_ms
            ),
            None => format!("the object had no lease; epoch {epoch}"),
        };
        let entry = AuditRecord::now(
            super::super::audit::instance_actor(self.instance),
            "lease_takeover",
            session.to_string(),
            "ok".to_string(),
        )
        .with_detail(detail);
        super::super::audit::append(&self.store, entry).await;
    }

    /// Before anything reads `session` here: makes sure this instance may serve it and holds
    /// its latest version.
    ///
    /// - While this instance's own lease has more than half its time left: nothing to ask.
    /// - Another instance's live lease: `Moved` to it (a 307 there).
    /// - Otherwise this instance takes the lease (a conditional write of the object). If the
    ///   bucket's version was written by another instance and differs from the local copy,
    ///   that copy is older: `Stale` until `replace`, then the bucket's version is fetched —
    ///   every page checked against its id — and replaces it. A conversation not here at all
    ///   is fetched the same way. A damaged object or page answers 422 and nothing is kept.
    ///
    /// While the bucket does not answer, a conversation the local store holds is served from
    /// it (the failure shows in `/health`; a conditional write still keeps this instance from
    /// overwriting a newer version later); one it lacks answers 503.
    pub async fn claim(&self, session: Uuid, replace: bool) -> Result<Claim, FleetError> {
        // It left this instance and the bucket has not heard yet: the local store's answer
        // (none, or a forward) stands; fetching the bucket's copy would bring it back.
        if self.leaving.lock().expect("leaving").contains(&session) {
            return Ok(Claim::Here);
        }
        // A bucket that just failed is not asked again on every request: each ask would wait
        // out object_store's retries (seconds) before the local copy served anyway.
        let failed_lately = self
            .bucket_failed_at
            .lock()
            .expect("failed at")
            .is_some_and(|at| at.elapsed() < ASK_FAILED_BUCKET_AFTER);
        if failed_lately {
            return self
                .serve_local(session, "the fleet's bucket failed moments ago")
                .await;
        }
        match self.claim_inner(session, replace).await {
            Err(FleetError::Unavailable(error)) => {
                *self.bucket_failed_at.lock().expect("failed at") = Some(Instant::now());
                self.health.lock().expect("health").last_error = Some(error.clone());
                self.serve_local(session, &error).await
            }
            other => other,
        }
    }

    /// While the bucket does not answer: the local copy, if there is one, else 503.
    async fn serve_local(&self, session: Uuid, error: &str) -> Result<Claim, FleetError> {
        let store = self.store.clone();
        let here = blocking(move || Ok(store.record(session)?.is_some())).await?;
        if here {
            tracing::warn!(%session, %error, "the bucket does not answer; serving the local copy");
            return Ok(Claim::Here);
        }
        Err(FleetError::Unavailable(format!(
            "conversation {session} is not on this instance and the fleet's bucket does not \
             answer; retry in a moment"
        )))
    }

    async fn claim_inner(&self, session: Uuid, replace: bool) -> Result<Claim, FleetError> {
        let now = now_ms();
        if let Some(owned) = self.owned.lock().expect("owned").get(&session)
            && owned.expires_ms > now + self.lease_ms / 2
        {
            return Ok(Claim::Here);
        }
        // A conversation this instance moved away is asked for too: a member it was handed to
        // may have handed it back, or died and left it to be taken over. Fetching it clears
        // the forward; a conversation the bucket does not hold stays forwarded.
        let store = self.store.clone();
        let local = blocking(move || Ok(store.record(session)?)).await?;
        for _ in 0..3 {
            let Some(found) = self
                .remote
                .conversation(session)
                .await
                .map_err(unreachable)?
            else {
                // Not in the bucket: new, or not uploaded yet; the local store answers.
                return Ok(Claim::Here);
            };
            let conversation = found.conversation;
            let fetch = match lease::decide(
                self.instance,
                local.as_ref(),
                &conversation,
                replace,
                now_ms(),
            ) {
                Decision::Elsewhere(target) => {
                    return Err(FleetError::Moved { session, target });
                }
                Decision::Stale => return Ok(Claim::Stale),
                Decision::Keep => false,
                Decision::Fetch => true,
            };
            let mine = self.is_mine(&conversation);
            let same = local
                .as_ref()
                .is_some_and(|l| l.checksum == conversation.record.checksum);
            if fetch {
                self.fetch(session, &conversation).await?;
            }
            let epoch = conversation.lease.as_ref().map_or(0, |l| l.epoch) + u64::from(!mine);
            let taken = RemoteConversation {
                lease: Some(self.lease(epoch.max(1))),
                ..conversation
            };
            match self
                .remote
                .put_conversation(session, &taken, Some(&found.version))
                .await
            {
                Ok(version) => {
                    self.own(session, version, &taken);
                    if !mine {
                        tracing::info!(%session, epoch, "took the conversation's lease");
                        self.audit_takeover(session, conversation.lease.as_ref(), epoch)
                            .await;
                    }
                    // A local copy newer than the bucket's goes up soon.
                    if local.is_some() && mine && !same && !fetch {
                        self.queue(session);
                    }
                    return Ok(Claim::Here);
                }
                // Someone wrote meanwhile: look again.
                Err(RemoteWriteError::Lost(_)) => continue,
                Err(RemoteWriteError::Store(e)) => return Err(unreachable(e)),
            }
        }
        Err(FleetError::Conflict(format!(
            "conversation {session} is changing hands between instances; retry in a moment"
        )))
    }
}
