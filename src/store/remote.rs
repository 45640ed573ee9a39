//! The shared tier: conversations and their pages in an S3-compatible bucket, through the
//! `object_store` crate, so any instance of a fleet can resume any conversation.
//!
//! Layout under the configured prefix:
//! - `pages/<hex id>`: a page's bytes, exactly as the local store keeps them. Content
//!   addressing makes uploads idempotent: a page is written with `If-None-Match: *` and an
//!   "already exists" answer means another writer stored the same bytes.
//! - `conversations/<uuid>`: a conversation's record, manifest and page list in one small
//!   object with its own checksum (`RemoteConversation`). It is the atomic switch: it is
//!   written only after every page it names is in the bucket, and only on the version this
//!   instance last saw (`If-Match`), so a writer that lost the conversation to another
//!   instance cannot overwrite the newer one.
//!
//! - `entries/<hex index name>/<uuid>`: an unnamed entry (`RemoteEntry`), under the name the
//!   local store indexes it by, so a member looks an entry up by listing the names of its
//!   prompt's boundaries. Entries never change (a longer conversation is a new entry), so they
//!   are written once, with `If-None-Match: *`, and need no lease.
//!
//! Nothing read from the bucket is trusted: the conversation object is checked against its
//! checksum here, and pages against their ids by the caller, before anything uses them.
//!
//! With encryption on (`sealed_with`), both kinds of object are sealed with the instance's
//! keys and pages and entries are named by their keyed names (`store::vault`), as in the local
//! store: the bucket never sees a page's content id, its bytes, a manifest, a record or a
//! prefix hash in the clear.
//! Every member of a fleet then needs the same key file.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientConfigKey, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::records::{EntryRecord, ResponseRecord, SessionRecord};
use super::vault::Vault;
use super::{PageId, RekeyProgress, StoreError};
use crate::keys::{Keys, sealed_key_id};

/// How sealed bucket objects name their place (associated data).
const PAGE_PLACE: &str = "bucket pages";
const CONVERSATION_PLACE: &str = "bucket conversations";
const ENTRY_PLACE: &str = "bucket entries";
const RESPONSE_PLACE: &str = "bucket responses";

const MAGIC: [u8; 8] = *b"KVSNAPR\x01";
const ENTRY_MAGIC: [u8; 8] = *b"KVSNAPU\x01";
const RESPONSE_MAGIC: [u8; 8] = *b"KVSNAPO\x01";

/// What a bucket needs besides its URL; each `None` falls back to the standard `AWS_*`
/// environment (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_ALLOW_HTTP`).
#[derive(Clone, Default, PartialEq)]
pub struct RemoteSettings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub allow_http: Option<bool>,
}

/// The secret never reaches a log line.
impl std::fmt::Debug for RemoteSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSettings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "redacted"),
            )
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

/// Which instance owns a conversation, until when. Written with every version of the
/// conversation object, so the last writer is always the owner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// The owner's instance id (kept in its store across restarts).
    pub instance: u64,
    /// Where other instances redirect requests while the lease is live.
    pub url: String,
    /// Counts changes of owner.
    pub epoch: u64,
    pub expires_ms: u64,
}

/// A conversation as the bucket keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteConversation {
    /// `None` only in objects written before leases.
    #[serde(default)]
    pub lease: Option<Lease>,
    pub record: SessionRecord,
    /// The manifest, as the local store keeps it (`snapshot::manifest` reads it).
    #[serde(with = "serde_bytes")]
    pub manifest: Vec<u8>,
    /// Every page id the manifest references, 32 bytes each, in its order.
    #[serde(with = "serde_bytes")]
    pub refs: Vec<u8>,
}

impl RemoteConversation {
    pub fn page_ids(&self) -> Vec<PageId> {
        page_ids(&self.refs)
    }

    fn encode(&self) -> Vec<u8> {
        encode_object(MAGIC, self)
    }

    fn decode(session: Uuid, bytes: &[u8]) -> Result<Self, StoreError> {
        let damaged = |why: &str| {
            StoreError::Damaged(
                session,
                format!("its conversation object in the bucket {why}"),
            )
        };
        let found: Self = decode_object(MAGIC, bytes).map_err(|why| damaged(&why))?;
        check_refs(&found.refs).map_err(damaged)?;
        Ok(found)
    }
}

/// An unnamed entry as the bucket keeps it: written once, never changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteEntry {
    pub record: EntryRecord,
    /// The manifest, as the local store keeps it.
    #[serde(with = "serde_bytes")]
    pub manifest: Vec<u8>,
    /// Every page id the manifest references, 32 bytes each, in its order.
    #[serde(with = "serde_bytes")]
    pub refs: Vec<u8>,
}

impl RemoteEntry {
    pub fn page_ids(&self) -> Vec<PageId> {
        page_ids(&self.refs)
    }

    fn decode(entry: Uuid, bytes: &[u8]) -> Result<Self, StoreError> {
        let damaged =
            |why: &str| StoreError::Damaged(entry, format!("its entry in the bucket {why}"));
        let found: Self = decode_object(ENTRY_MAGIC, bytes).map_err(|why| damaged(&why))?;
        check_refs(&found.refs).map_err(damaged)?;
        Ok(found)
    }
}

/// A page list as objects keep it: 32-byte ids, one after another.
fn page_ids(refs: &[u8]) -> Vec<PageId> {
    refs.chunks_exact(32)
        .map(|c| c.try_into().expect("32 bytes"))
        .collect()
}

fn check_refs(refs: &[u8]) -> Result<(), &'static str> {
    if refs.len().is_multiple_of(32) {
        Ok(())
    } else {
        Err("lists a page id of the wrong size")
    }
}

/// `value` after `magic`, followed by the blake3 of both.
fn encode_object(magic: [u8; 8], value: &impl Serialize) -> Vec<u8> {
    let mut out = magic.to_vec();
    rmp_serde::encode::write_named(&mut out, value).expect("a record always serializes");
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// What `encode_object` wrote, checked; otherwise why it is not.
fn decode_object<T: serde::de::DeserializeOwned>(
    magic: [u8; 8],
    bytes: &[u8],
) -> Result<T, String> {
    if bytes.len() < magic.len() + 32 || bytes[..magic.len()] != magic {
        return Err("is not one kvsnap wrote".into());
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err("does not match its checksum".into());
    }
    rmp_serde::from_slice(&body[magic.len()..]).map_err(|e| format!("cannot be read: {e}"))
}

/// A conversation object and the version it was read at (for a conditional write).
pub struct Versioned {
    pub conversation: RemoteConversation,
    pub version: UpdateVersion,
}

/// Why a conditional write of a conversation object did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RemoteWriteError {
    /// Another writer changed (or created) the object since the version given.
    #[error("another instance wrote conversation {0} in the bucket since this one last saw it")]
    Lost(Uuid),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One bucket (and prefix).
pub struct Remote {
    objects: Arc<dyn ObjectStore>,
    vault: Vault,
    prefix: String,
    /// `s3://bucket/prefix`, for messages (no secrets).
    pub url: String,
    /// The endpoint serving it (empty: AWS's own), so two instances can tell whether they
    /// share one bucket.
    pub endpoint: String,
}

impl Remote {
    /// A client for `url` (`s3://bucket` or `s3://bucket/prefix`). Nothing is contacted yet.
    pub fn open(url: &str, settings: &RemoteSettings) -> Result<Self, StoreError> {
        let invalid = |why: String| StoreError::Open {
            path: url.to_string(),
            message: why,
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| invalid("a remote is named s3://bucket or s3://bucket/prefix".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.len() < 3 {
            return Err(invalid("bucket names have at least 3 characters".into()));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &settings.region {
            builder = builder.with_region(region);
        }
        if let Some(key) = &settings.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &settings.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if let Some(allow) = settings.allow_http {
            builder = builder.with_allow_http(allow);
        }
        // A bucket that does not answer must show within seconds (`/health` says "degraded",
        // the uploader backs off and retries), not after object_store's default three minutes
        // of retries; a remote-sync turn must not hang for that long either.
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: Duration::from_secs(10),
        };
        let endpoint = builder
            .get_config_value(&AmazonS3ConfigKey::Endpoint)
            .unwrap_or_default();
        // Set key by key: `with_client_options` would replace what `from_env` read (such as
        // AWS_ALLOW_HTTP).
        let objects = builder
            .with_retry(retry)
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                "3s",
            )
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), "60s")
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Remote {
            objects: Arc::new(objects),
            vault: Vault::plain(),
            prefix: prefix.trim_matches('/').to_string(),
            url: url.to_string(),
            endpoint,
        })
    }

    /// The same bucket, with every object sealed with `keys` (see the module's note).
    pub fn sealed_with(mut self, keys: Arc<Keys>) -> Remote {
        self.vault = Vault::sealed(keys);
        self
    }

    fn path(&self, rest: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rest)
        } else {
            Path::from(format!("{}/{rest}", self.prefix))
        }
    }

    fn page_path(&self, id: &PageId) -> Path {
        self.path(&format!("pages/{}", hex::encode(self.vault.page_name(id))))
    }

    fn conversation_path(&self, session: Uuid) -> Path {
        self.path(&format!("conversations/{session}"))
    }

    /// Where the entries indexed under `index` are listed.
    fn entries_path(&self, index: &PageId) -> Path {
        self.path(&format!(
            "entries/{}",
            hex::encode(self.vault.page_name(index))
        ))
    }

    fn response_path(&self, id: Uuid) -> Path {
        self.path(&format!("responses/{id}"))
    }

    fn entry_path(&self, index: &PageId, entry: Uuid) -> Path {
        self.entries_path(index).join(entry.to_string())
    }

    fn failed(&self, what: &str, error: object_store::Error) -> StoreError {
        StoreError::Io(format!(
            "the bucket {} failed to {what}: {error:?}",
            self.url
        ))
    }

    /// Whether the bucket holds this page.
    pub async fn has_page(&self, id: &PageId) -> Result<bool, StoreError> {
        match self.objects.head(&self.page_path(id)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.failed("answer whether it holds a page", e)),
        }
    }

    /// Stores a page unless the bucket has it; true when this call wrote it.
    pub async fn put_page(&self, id: &PageId, bytes: Bytes) -> Result<bool, StoreError> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let sealed = if self.vault.keys().is_some() {
            let name = self.vault.page_name(id);
            Bytes::from(self.vault.seal(PAGE_PLACE, &name, &bytes).into_owned())
        } else {
            bytes
        };
        let put = self
            .objects
            .put_opts(&self.page_path(id), PutPayload::from(sealed), options)
            .await;
        match put {
            Ok(_) => Ok(true),
            // Content addressing: whoever wrote it first wrote these bytes (checked on read).
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.failed("store a page", e)),
        }
    }

    /// A page's bytes as the bucket has them (unchecked: the caller checks them against the
    /// id); `None` if it has none.
    pub async fn page(&self, id: &PageId) -> Result<Option<Bytes>, StoreError> {
        let got = match self.objects.get(&self.page_path(id)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.failed("give a page", e)),
        };
        let bytes = got
            .bytes()
            .await
            .map_err(|e| self.failed("give a page", e))?;
        if self.vault.keys().is_none() {
            return Ok(Some(bytes));
        }
        let name = self.vault.page_name(id);
        let page = self.vault.open(PAGE_PLACE, &name, &bytes)?.into_owned();
        Ok(Some(Bytes::from(page)))
    }

    /// The conversation object and its version; `None` if the bucket has none.
    pub async fn conversation(&self, session: Uuid) -> Result<Option<Versioned>, StoreError> {
        let path = self.conversation_path(session);
        let Some((bytes, version)) = self.get_versioned(&path, "give a conversation").await? else {
            return Ok(None);
        };
        let opened = self
            .vault
            .open(CONVERSATION_PLACE, session.as_bytes(), &bytes)
            .map_err(|e| StoreError::Damaged(session, format!("its object in the bucket: {e}")))?;
        Ok(Some(Versioned {
            conversation: RemoteConversation::decode(session, &opened)?,
            version,
        }))
    }

    /// An object's bytes and the version a conditional put must name to replace exactly it;
    /// `None` if the bucket has no such object.
    async fn get_versioned(
        &self,
        location: &Path,
        doing: &str,
    ) -> Result<Option<(Bytes, UpdateVersion)>, StoreError> {
        let got = match self.objects.get(location).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.failed(doing, e)),
        };
        let version = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = got.bytes().await.map_err(|e| self.failed(doing, e))?;
        Ok(Some((bytes, version)))
    }

    /// Writes the conversation object: created when `seen` is `None` (and the bucket must have
    /// none), else replacing exactly the version `seen`. Returns the new version.
    pub async fn put_conversation(
        &self,
        session: Uuid,
        conversation: &RemoteConversation,
        seen: Option<&UpdateVersion>,
    ) -> Result<UpdateVersion, RemoteWriteError> {
        let mode = match seen {
            Some(version) => PutMode::Update(version.clone()),
            None => PutMode::Create,
        };
        let options = PutOptions {
            mode,
            ..Default::default()
        };
        let encoded = conversation.encode();
        let sealed = self
            .vault
            .seal(CONVERSATION_PLACE, session.as_bytes(), &encoded)
            .into_owned();
        let payload = PutPayload::from(sealed);
        match self
            .objects
            .put_opts(&self.conversation_path(session), payload, options)
            .await
        {
            Ok(put) => Ok(UpdateVersion::from(put)),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Err(RemoteWriteError::Lost(session)),
            Err(e) => Err(self.failed("store a conversation", e).into()),
        }
    }

    /// Stores an entry under its index name unless the bucket has it (entries never change,
    /// so one already there holds these bytes).
    pub async fn put_entry(&self, id: Uuid, entry: &RemoteEntry) -> Result<(), StoreError> {
        let index: PageId =
            entry.record.index.as_slice().try_into().map_err(|_| {
                StoreError::Io(format!("entry {id} has no index name to be found by"))
            })?;
        self.put_once(
            &self.entry_path(&index, id),
            (ENTRY_PLACE, id.as_bytes()),
            &encode_object(ENTRY_MAGIC, entry),
            "store an entry",
        )
        .await
    }

    /// Writes an object that never changes, sealed at `place`, unless the bucket has it (one
    /// already there holds the same bytes).
    async fn put_once(
        &self,
        path: &Path,
        (place, key): (&str, &[u8]),
        plain: &[u8],
        doing: &str,
    ) -> Result<(), StoreError> {
        let sealed = self.vault.seal(place, key, plain).into_owned();
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .objects
            .put_opts(path, PutPayload::from(sealed), options)
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(self.failed(doing, e)),
        }
    }

    /// Stores a response unless the bucket has it (a response never changes, so one already
    /// there holds these bytes).
    pub async fn put_response(&self, id: Uuid, record: &ResponseRecord) -> Result<(), StoreError> {
        self.put_once(
            &self.response_path(id),
            (RESPONSE_PLACE, id.as_bytes()),
            &encode_object(RESPONSE_MAGIC, record),
            "store a response",
        )
        .await
    }

    /// Response `id`, checked; `None` if the bucket has none.
    pub async fn response(&self, id: Uuid) -> Result<Option<ResponseRecord>, StoreError> {
        let path = self.response_path(id);
        let Some((bytes, _)) = self.get_versioned(&path, "give a response").await? else {
            return Ok(None);
        };
        let damaged =
            |why: String| StoreError::Damaged(id, format!("its response in the bucket {why}"));
        let opened = self
            .vault
            .open(RESPONSE_PLACE, id.as_bytes(), &bytes)
            .map_err(|e| damaged(format!("cannot be opened: {e}")))?;
        decode_object(RESPONSE_MAGIC, &opened)
            .map(Some)
            .map_err(damaged)
    }

    /// Removes response `id`, if the bucket has it.
    pub async fn delete_response(&self, id: Uuid) -> Result<(), StoreError> {
        match self.objects.delete(&self.response_path(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed("delete a response", e)),
        }
    }

    /// The entries the bucket indexes under `index` (a plain index name).
    pub async fn entries_at(&self, index: &PageId) -> Result<Vec<Uuid>, StoreError> {
        use futures::TryStreamExt;
        let listed: Vec<_> = self
            .objects
            .list(Some(&self.entries_path(index)))
            .try_collect()
            .await
            .map_err(|e| self.failed("list entries", e))?;
        Ok(listed
            .iter()
            .filter_map(|meta| Uuid::parse_str(meta.location.filename()?).ok())
            .collect())
    }

    /// Entry `id` indexed under `index`, checked; `None` if the bucket has none.
    pub async fn entry(&self, index: &PageId, id: Uuid) -> Result<Option<RemoteEntry>, StoreError> {
        let path = self.entry_path(index, id);
        let Some((bytes, _)) = self.get_versioned(&path, "give an entry").await? else {
            return Ok(None);
        };
        let opened = self
            .vault
            .open(ENTRY_PLACE, id.as_bytes(), &bytes)
            .map_err(|e| StoreError::Damaged(id, format!("its entry in the bucket: {e}")))?;
        RemoteEntry::decode(id, &opened).map(Some)
    }

    /// Seals every object the bucket holds under an older key with the current one, as
    /// `Store::rekey` does for the local file. A conversation object another instance rewrites
    /// meanwhile is left to it (it seals with the current key too).
    pub async fn rekey(
        &self,
        report: &mut (dyn FnMut(RekeyProgress) + Send),
    ) -> Result<RekeyProgress, StoreError> {
        use futures::TryStreamExt;
        let Some(keys) = self.vault.keys() else {
            return Err(StoreError::Io("this bucket is not encrypted".into()));
        };
        let ring = keys.ring();
        let mut stale = Vec::new();
        for kind in ["pages", "conversations", "entries", "responses"] {
            let listed: Vec<_> = self
                .objects
                .list(Some(&self.path(kind)))
                .try_collect()
                .await
                .map_err(|e| self.failed("list its objects", e))?;
            stale.extend(listed.into_iter().map(|meta| (kind, meta.location)));
        }
        let mut progress = RekeyProgress::default();
        for (kind, location) in stale {
            let Some((bytes, version)) = self.get_versioned(&location, "give an object").await?
            else {
                continue;
            };
            if sealed_key_id(&bytes) == Some(ring.current()) {
                continue;
            }
            progress.found += 1;
            let name = location.filename().unwrap_or_default();
            let uuid_bytes = || {
                Uuid::parse_str(name)
                    .map(|u| u.as_bytes().to_vec())
                    .unwrap_or_default()
            };
            let (place, key) = match kind {
                "pages" => (PAGE_PLACE, hex::decode(name).unwrap_or_default()),
                "entries" => (ENTRY_PLACE, uuid_bytes()),
                "responses" => (RESPONSE_PLACE, uuid_bytes()),
                _ => (CONVERSATION_PLACE, uuid_bytes()),
            };
            let plain = ring
                .open(&super::vault::place(place, &key), &bytes)
                .map_err(|e| {
                    StoreError::Io(format!("the bucket object {location} cannot be read: {e}"))
                })?;
            let resealed = ring.seal(&super::vault::place(place, &key), &plain);
            let options = PutOptions {
                mode: PutMode::Update(version),
                ..Default::default()
            };
            match self
                .objects
                .put_opts(&location, PutPayload::from(resealed), options)
                .await
            {
                Ok(_) | Err(object_store::Error::Precondition { .. }) => {}
                Err(e) => return Err(self.failed("store an object sealed again", e)),
            }
            progress.done += 1;
            report(progress);
        }
        Ok(progress)
    }

    /// Removes the conversation object (its pages stay: other conversations may share them).
    pub async fn delete_conversation(&self, session: Uuid) -> Result<(), StoreError> {
        match self.objects.delete(&self.conversation_path(session)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed("delete a conversation", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> RemoteConversation {
        RemoteConversation {
            lease: Some(Lease {
                instance: 9,
                url: "http://127.0.0.1:1".into(),
                epoch: 2,
                expires_ms: 3,
            }),
            record: SessionRecord {
                record_version: super::super::records::RECORD_VERSION,
                owner: Some("abc".into()),
                created_ms: 1,
                last_used_ms: 2,
                tokens: 3,
                bytes: 4,
                chunks: 0,
                checksum: "00".repeat(32),
                model: "m".into(),
                damaged: None,
                compute_profile: Some("avx512".into()),
                saves: 1,
            },
            manifest: vec![1, 2, 3],
            refs: vec![7; 64],
        }
    }

    #[test]
    fn a_conversation_object_round_trips_and_any_flipped_byte_is_damage() {
        let session = Uuid::new_v4();
        let encoded = conversation().encode();
        let decoded = RemoteConversation::decode(session, &encoded).unwrap();
        assert_eq!(decoded, conversation());
        assert_eq!(decoded.page_ids(), vec![[7u8; 32]; 2]);
        for at in [0, MAGIC.len(), encoded.len() / 2, encoded.len() - 1] {
            let mut bad = encoded.clone();
            bad[at] ^= 1;
            assert!(matches!(
                RemoteConversation::decode(session, &bad),
                Err(StoreError::Damaged(..))
            ));
        }
        assert!(RemoteConversation::decode(session, &encoded[..10]).is_err());
    }

    #[test]
    fn an_entry_object_round_trips_and_is_not_taken_for_a_conversation() {
        let entry = RemoteEntry {
            record: EntryRecord {
                record_version: super::super::records::RECORD_VERSION,
                owner: None,
                created_ms: 1,
                last_used_ms: 2,
                tokens: 70,
                tokens_hash: vec![3; 32],
                model: "m".into(),
                checkpoint: true,
                index: vec![4; 32],
            },
            manifest: vec![5],
            refs: vec![6; 32],
        };
        let id = Uuid::new_v4();
        let encoded = encode_object(ENTRY_MAGIC, &entry);
        assert_eq!(RemoteEntry::decode(id, &encoded).unwrap(), entry);
        assert!(RemoteConversation::decode(id, &encoded).is_err());
        let mut bad = encoded.clone();
        bad[encoded.len() / 2] ^= 1;
        assert!(matches!(
            RemoteEntry::decode(id, &bad),
            Err(StoreError::Damaged(..))
        ));
    }

    #[test]
    fn remote_urls_are_checked() {
        let settings = RemoteSettings::default();
        assert!(Remote::open("http://bucket", &settings).is_err());
        assert!(Remote::open("s3://ab", &settings).is_err());
        let remote = Remote::open("s3://kvsnap/fleet/a/", &settings).unwrap();
        assert_eq!(remote.prefix, "fleet/a");
        assert_eq!(
            remote.conversation_path(Uuid::nil()).as_ref(),
            format!("fleet/a/conversations/{}", Uuid::nil())
        );
    }
}
