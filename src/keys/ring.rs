//! Sealing with the keys of one key file: XChaCha20-Poly1305, a key id beside every blob,
//! nonces that never repeat, and the keyed names of pages.
//!
//! A sealed blob is `[1][id length][key id][24-byte nonce][ciphertext and 16-byte tag]`. The
//! associated data names where the blob belongs (a table and key, an object name), so a blob
//! moved to another place does not open there.
//!
//! Nonces: 16 random bytes drawn when the ring is made, then a 64-bit counter. One ring never
//! gives the same nonce twice (the counter would have to pass 2^64); two rings (processes,
//! reloads, instances of a fleet) share a prefix with probability 2^-128 per pair, and the
//! 192-bit nonce of XChaCha20 exists so that random nonces are safe.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use super::KeyError;
use super::file::{KeyFile, Secret};

const SEALED_VERSION: u8 = 1;
const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;

/// The keys of one key file, ready to seal and open.
pub struct KeyRing {
    page_ids: Secret,
    current: String,
    ciphers: BTreeMap<String, XChaCha20Poly1305>,
    nonce_prefix: [u8; 16],
    nonce_counter: AtomicU64,
}

impl KeyRing {
    pub fn new(file: &KeyFile) -> Result<KeyRing, KeyError> {
        let mut nonce_prefix = [0u8; 16];
        getrandom::fill(&mut nonce_prefix)
            .map_err(|e| KeyError(format!("the system's random source failed: {e}")))?;
        let ciphers = file
            .keys
            .iter()
            .map(|(id, key)| (id.clone(), XChaCha20Poly1305::new(key.as_slice().into())))
            .collect();
        Ok(KeyRing {
            page_ids: file.page_ids.clone(),
            current: file.current.clone(),
            ciphers,
            nonce_prefix,
            nonce_counter: AtomicU64::new(0),
        })
    }

    /// The id of the key new blobs are sealed with.
    pub fn current(&self) -> &str {
        &self.current
    }

    /// Whether the ring can open blobs sealed with key `id`.
    pub fn has_key(&self, id: &str) -> bool {
        self.ciphers.contains_key(id)
    }

    /// Identifies the page-naming key without revealing it: stores record it, so a key file
    /// that would name pages differently is refused at open.
    pub fn page_ids_check(&self) -> [u8; 16] {
        let check = blake3::keyed_hash(&self.page_ids, b"kvsnap page-id key check v1");
        check.as_bytes()[..16].try_into().expect("16 of 32 bytes")
    }

    /// The name a content id is stored under: a keyed hash, so that knowing a page's bytes
    /// (a common system prompt, say) does not tell whether a store or bucket holds it.
    pub fn page_name(&self, content_id: &[u8; 32]) -> [u8; 32] {
        *blake3::keyed_hash(&self.page_ids, content_id).as_bytes()
    }

    /// `plaintext` sealed with the current key, bound to `place`.
    pub fn seal(&self, place: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let cipher = &self.ciphers[&self.current];
        let nonce = self.next_nonce();
        let ciphertext = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: place,
                },
            )
            .expect("XChaCha20-Poly1305 seals any length kvsnap writes");
        let id = self.current.as_bytes();
        let mut out = Vec::with_capacity(2 + id.len() + NONCE_BYTES + ciphertext.len());
        out.push(SEALED_VERSION);
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// Opens a blob `seal` made for `place`. Fails with a sentence when the blob is not one,
    /// names a key this ring lacks, or was changed, moved or sealed with another key.
    pub fn open(&self, place: &[u8], sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
        let (id, nonce, ciphertext) = split(sealed)?;
        let Some(cipher) = self.ciphers.get(id) else {
            return Err(KeyError(format!(
                "it is sealed with key {id:?}, which the key file does not list (keep every \
                 key until `kvsnap rekey` has finished)"
            )));
        };
        cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: place,
                },
            )
            .map_err(|_| {
                KeyError(format!(
                    "it does not open with key {id:?}: it was changed, moved, or sealed with \
                     another key of that name"
                ))
            })
    }

    fn next_nonce(&self) -> [u8; NONCE_BYTES] {
        let count = self.nonce_counter.fetch_add(1, Ordering::Relaxed);
        // 2^64 seals by one process are out of reach; refuse rather than repeat regardless.
        assert!(count != u64::MAX, "nonce counter exhausted");
        let mut nonce = [0u8; NONCE_BYTES];
        nonce[..16].copy_from_slice(&self.nonce_prefix);
        nonce[16..].copy_from_slice(&count.to_le_bytes());
        nonce
    }
}

/// The key id a sealed blob names, if it is one.
pub fn sealed_key_id(sealed: &[u8]) -> Option<&str> {
    split(sealed).ok().map(|(id, _, _)| id)
}

fn split(sealed: &[u8]) -> Result<(&str, &[u8], &[u8]), KeyError> {
    let not_sealed = || KeyError("it is not a blob kvsnap sealed".into());
    let [version, id_len, rest @ ..] = sealed else {
        return Err(not_sealed());
    };
    if *version != SEALED_VERSION {
        return Err(not_sealed());
    }
    let id_len = usize::from(*id_len);
    if rest.len() < id_len + NONCE_BYTES + TAG_BYTES {
        return Err(not_sealed());
    }
    let (id, rest) = rest.split_at(id_len);
    let id = std::str::from_utf8(id).map_err(|_| not_sealed())?;
    let (nonce, ciphertext) = rest.split_at(NONCE_BYTES);
    Ok((id, nonce, ciphertext))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> (KeyFile, KeyRing) {
        let file = KeyFile::generate().unwrap();
        let ring = KeyRing::new(&file).unwrap();
        (file, ring)
    }

    #[test]
    fn sealed_blobs_open_only_in_their_place_unchanged() {
        let (_, ring) = ring();
        let sealed = ring.seal(b"pages/1", b"the prompt");
        assert_eq!(sealed_key_id(&sealed), Some("k1"));
        assert!(!sealed.windows(10).any(|w| w == b"the prompt"));
        assert_eq!(ring.open(b"pages/1", &sealed).unwrap(), b"the prompt");
        assert!(ring.open(b"pages/2", &sealed).is_err(), "moved");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(ring.open(b"pages/1", &bad).is_err(), "byte {i} flipped");
        }
        assert!(ring.open(b"pages/1", &sealed[..sealed.len() - 1]).is_err());
        assert!(ring.open(b"pages/1", b"").is_err());
    }

    #[test]
    fn nonces_never_repeat_and_rings_differ() {
        let (file, ring) = ring();
        let a = ring.seal(b"x", b"same");
        let b = ring.seal(b"x", b"same");
        assert_ne!(a, b, "the same plaintext seals differently each time");
        let other = KeyRing::new(&file).unwrap();
        assert_ne!(ring.nonce_prefix, other.nonce_prefix);
        assert_eq!(other.open(b"x", &a).unwrap(), b"same", "same key file");
    }

    #[test]
    fn a_rotated_ring_opens_old_blobs_and_seals_new_ones_with_the_new_key() {
        let (mut file, ring) = ring();
        let old = ring.seal(b"x", b"old");
        file.rotate().unwrap();
        let rotated = KeyRing::new(&file).unwrap();
        assert_eq!(rotated.open(b"x", &old).unwrap(), b"old");
        assert_eq!(sealed_key_id(&rotated.seal(b"x", b"new")), Some("k2"));
        assert_eq!(ring.page_ids_check(), rotated.page_ids_check());
        assert_eq!(ring.page_name(&[7; 32]), rotated.page_name(&[7; 32]));
        let stranger = KeyRing::new(&KeyFile::generate().unwrap()).unwrap();
        assert!(stranger.open(b"x", &old).is_err());
        assert_ne!(stranger.page_ids_check(), ring.page_ids_check());
    }
}
