//! Finding kept state by its tokens: the names under which unnamed entries are indexed, and
//! the search for the longest entry a prompt begins with.
//!
//! An entry is indexed once, under the hash of its tokens up to the last multiple of
//! `BOUNDARY` it holds. A prompt is looked up under the hash of each of its own boundaries,
//! longest first; an entry found there is the prompt's only if the hash of all its tokens
//! equals the hash of as many of the prompt's. Every hash starts from a salt naming the owner,
//! the model and the cache layout (`pages::page_salt`), so one key's entries are never found
//! by another's prompts, nor a model's by another's; the store keys the names when sealed, so
//! the index says nothing of the tokens.

use uuid::Uuid;

use crate::snapshot::pages::{self, PageId};
use crate::snapshot::{LayoutIdentity, LiveIdentity, ModelIdentity};
use crate::store::records::EntryRecord;
use crate::store::{Store, StoreError};

/// Tokens between two index boundaries: an entry shorter than this is not kept.
pub const BOUNDARY: usize = 64;

/// The salt of one owner's prefixes on one model and layout.
pub fn salt(model: &ModelIdentity, layout: &LayoutIdentity, owner: Option<&str>) -> [u8; 32] {
    let page_salt = pages::page_salt(model, layout, owner);
    *blake3::Hasher::new_derive_key("kvsnap 2026 token prefix v1")
        .update(&page_salt)
        .finalize()
        .as_bytes()
}

/// The hash of `tokens` under `salt`.
pub fn prefix_hash(salt: &[u8; 32], tokens: &[i32]) -> PageId {
    hash_bytes(salt, &token_bytes(tokens))
}

/// What the hashes hash: each token as four little-endian bytes.
fn token_bytes(tokens: &[i32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn hash_bytes(salt: &[u8; 32], bytes: &[u8]) -> PageId {
    *blake3::Hasher::new_keyed(salt)
        .update(bytes)
        .finalize()
        .as_bytes()
}

/// The boundary an entry of `len` tokens is indexed under; `None` when it is too short.
pub fn index_point(len: usize) -> Option<usize> {
    (len >= BOUNDARY).then_some(len - len % BOUNDARY)
}

/// The hashes of `tokens` up to each boundary, longest first.
pub fn boundary_hashes(salt: &[u8; 32], tokens: &[i32]) -> Vec<PageId> {
    boundaries_of(salt, &token_bytes(tokens))
}

/// `boundary_hashes` of tokens already turned into bytes: one pass, the hasher carried on.
fn boundaries_of(salt: &[u8; 32], bytes: &[u8]) -> Vec<PageId> {
    let mut hasher = blake3::Hasher::new_keyed(salt);
    let mut out: Vec<PageId> = bytes
        .chunks_exact(BOUNDARY * 4)
        .map(|chunk| *hasher.update(chunk).finalize().as_bytes())
        .collect();
    out.reverse();
    out
}

/// An entry whose tokens begin a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub entry: Uuid,
    /// How many tokens it holds: the prompt's first `tokens` are its.
    pub tokens: usize,
    /// Whether it is a checkpoint (`EntryRecord::checkpoint`).
    pub checkpoint: bool,
}

/// A prompt as its key looks for entries: the index names it may find them under and the
/// test an entry must pass to be the prompt's.
pub struct Wanted<'a> {
    salt: [u8; 32],
    /// The prompt as the hashes read it, once: each candidate hashes a prefix of it.
    bytes: Vec<u8>,
    owner: Option<&'a str>,
    model: &'a str,
    checkpoints_only: bool,
}

impl<'a> Wanted<'a> {
    /// What `owner`'s `prompt` may resume on this model (only checkpoints, with
    /// `checkpoints_only`: a new named conversation must compute what a cold start would).
    pub fn new(
        identity: &'a LiveIdentity,
        owner: Option<&'a str>,
        prompt: &[i32],
        checkpoints_only: bool,
    ) -> Self {
        Wanted {
            salt: salt(&identity.model, &identity.layout, owner),
            bytes: token_bytes(prompt),
            owner,
            model: &identity.model.file_hash,
            checkpoints_only,
        }
    }

    /// The index names of the prompt's boundaries, longest first, each with its boundary.
    pub fn names(&self) -> Vec<(usize, PageId)> {
        let names = boundaries_of(&self.salt, &self.bytes);
        let count = names.len();
        names
            .into_iter()
            .enumerate()
            .map(|(i, name)| ((count - i) * BOUNDARY, name))
            .collect()
    }

    /// Whether `record` holds only tokens this prompt begins with, for this key and model.
    pub fn fits(&self, record: &EntryRecord) -> bool {
        let len = record.tokens as usize;
        len * 4 <= self.bytes.len()
            && (record.checkpoint || !self.checkpoints_only)
            && record.owner.as_deref() == self.owner
            && record.model == self.model
            && record.tokens_hash == hash_bytes(&self.salt, &self.bytes[..len * 4])
    }
}

/// The entry of `owner` holding the most tokens that all begin `prompt` (a checkpoint, with
/// `checkpoints_only`), if one is kept.
pub fn find(
    store: &Store,
    identity: &LiveIdentity,
    owner: Option<&str>,
    prompt: &[i32],
    checkpoints_only: bool,
) -> Result<Option<Found>, StoreError> {
    let wanted = Wanted::new(identity, owner, prompt, checkpoints_only);
    let names: Vec<PageId> = wanted.names().into_iter().map(|(_, name)| name).collect();
    if names.is_empty() {
        return Ok(None);
    }
    let mut fits = |record: &EntryRecord| wanted.fits(record);
    Ok(store
        .find_entry(&names, &mut fits)?
        .map(|(entry, record)| Found {
            entry,
            tokens: record.tokens as usize,
            checkpoint: record.checkpoint,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_indexed_under_a_hash_every_longer_prompt_computes() {
        let salt = [7u8; 32];
        let entry: Vec<i32> = (0..150).collect();
        let point = index_point(entry.len()).unwrap();
        assert_eq!(point, 128);
        let name = prefix_hash(&salt, &entry[..point]);
        let prompt: Vec<i32> = (0..300).collect();
        let names = boundary_hashes(&salt, &prompt);
        assert_eq!(names.len(), 4);
        // Longest first: 256, 192, 128, 64.
        assert_eq!(names[2], name);
        assert_eq!(names[0], prefix_hash(&salt, &prompt[..256]));
    }

    #[test]
    fn another_salt_or_token_names_another_prefix() {
        let tokens: Vec<i32> = (0..64).collect();
        let mut other = tokens.clone();
        other[63] = 1000;
        assert_ne!(
            prefix_hash(&[1; 32], &tokens),
            prefix_hash(&[2; 32], &tokens)
        );
        assert_ne!(
            prefix_hash(&[1; 32], &tokens),
            prefix_hash(&[1; 32], &other)
        );
        assert_eq!(index_point(63), None);
    }
}
