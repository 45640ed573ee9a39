//! A conversation arriving page by page from another instance that shares no bucket with this
//! one (`migrate/` is the sending side).
//!
//! 1. `offer`: the source sends the conversation's manifest and its snapshot's checksum; the
//!    answer names the pages this instance lacks (pages it already stores, say of a system
//!    prompt another conversation of the same owner shares, are not sent again).
//! 2. `receive_page`, once per missing page: each is checked against its id under the
//!    manifest's salt before it is kept, durably, beside the offer.
//! 3. `assemble`: once every page is here, the snapshot file is put back together and checked
//!    against the offered checksum; the caller imports it like any upload (verified, committed
//!    with fsync) and then calls `finish`.
//!
//! A transfer that broke off resumes at step 1: the answer leaves out the pages kept so far.

use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use super::ConversationError;
use super::blocking;
use crate::clock::now_ms;
use crate::snapshot::manifest::Manifest;
use crate::snapshot::pages::{self, PageId};
use crate::store::records::{IncomingRecord, RECORD_VERSION};
use crate::store::{IncomingPages, Store};

/// What the source says about the conversation it offers.
pub struct Offer {
    pub manifest: Bytes,
    pub owner: Option<String>,
    pub created_ms: u64,
    pub checksum: String,
}

/// Starts or resumes receiving `session`; answers where its pages are.
pub async fn offer(
    store: Arc<Store>,
    session: Uuid,
    offer: Offer,
) -> Result<IncomingPages, ConversationError> {
    let manifest = Manifest::decode(&offer.manifest)?;
    let checksum = offer.checksum.to_ascii_lowercase();
    if checksum.len() != 64 || !checksum.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ConversationError::Invalid(
            "the checksum of an offered conversation is 64 hex digits (blake3)".into(),
        ));
    }
    let mut ids = manifest.page_ids();
    ids.sort_unstable();
    ids.dedup();
    let record = IncomingRecord {
        record_version: RECORD_VERSION,
        owner: offer.owner,
        created_ms: offer.created_ms,
        checksum,
        manifest: offer.manifest.to_vec(),
        offered_ms: now_ms(),
    };
    blocking(move || Ok(store.offer_incoming(session, &record, &ids)?)).await
}

/// Keeps one page of the conversation offered as `session`, after checking it against its id.
pub async fn receive_page(
    store: Arc<Store>,
    session: Uuid,
    id: PageId,
    bytes: Bytes,
) -> Result<(), ConversationError> {
    blocking(move || {
        let offer = open_offer(&store, session)?;
        let manifest = Manifest::decode(&offer.manifest)?;
        if !manifest.page_ids().contains(&id) {
            return Err(ConversationError::Invalid(format!(
                "page {} is not one of the pages conversation {session} was offered with",
                hex::encode(id)
            )));
        }
        if pages::page_id(&manifest.salt(offer.owner.as_deref()), &bytes) != id {
            return Err(ConversationError::Damaged(format!(
                "page {} of conversation {session} does not match its id: it was damaged in \
                 transfer; send it again",
                hex::encode(id)
            )));
        }
        if !store.stage_page(session, &id, &bytes)? {
            return Err(not_offered(session));
        }
        Ok(())
    })
    .await
}

/// The snapshot file of the conversation offered as `session`, put back together from its
/// pages and checked against the offered checksum, with the offer. A file that does not match
/// drops the offer (its pages cannot be trusted) and answers 422.
pub async fn assemble(
    store: Arc<Store>,
    session: Uuid,
) -> Result<(Vec<u8>, IncomingRecord), ConversationError> {
    blocking(move || {
        let offer = open_offer(&store, session)?;
        let manifest = Manifest::decode(&offer.manifest)?;
        let mut ids = manifest.page_ids();
        ids.sort_unstable();
        ids.dedup();
        // Pages are not checked against their ids again: the file they assemble to is checked
        // against the offered checksum below, which any damaged page would fail.
        let mut found = std::collections::HashMap::with_capacity(ids.len());
        let mut missing = 0;
        for id in ids {
            match store.incoming_page(session, &id)? {
                Some(bytes) => {
                    found.insert(id, bytes);
                }
                None => missing += 1,
            }
        }
        if missing > 0 {
            return Err(ConversationError::Conflict(format!(
                "{missing} pages of conversation {session} have not arrived; send them, then \
                 commit"
            )));
        }
        let mut state = Vec::new();
        manifest.assemble_state(&|id| found.get(id).map(Vec::as_slice), &mut state, 0)?;
        let file = manifest.snapshot(&state).encode()?;
        if crate::snapshot::checksum(&file).to_hex().as_str() != offer.checksum {
            store.end_incoming(session)?;
            return Err(ConversationError::Damaged(format!(
                "conversation {session} assembled from the pages sent does not match the \
                 offered checksum; offer it again"
            )));
        }
        Ok((file, offer))
    })
    .await
}

/// Drops what is left of the transfer of `session` (after its import, or to give up on it).
pub async fn finish(store: Arc<Store>, session: Uuid) -> Result<(), ConversationError> {
    blocking(move || Ok(store.end_incoming(session)?)).await
}

fn open_offer(store: &Store, session: Uuid) -> Result<IncomingRecord, ConversationError> {
    store.incoming(session)?.ok_or_else(|| not_offered(session))
}

fn not_offered(session: Uuid) -> ConversationError {
    ConversationError::NotFound(format!(
        "no transfer of conversation {session} is open here; offer it first"
    ))
}
