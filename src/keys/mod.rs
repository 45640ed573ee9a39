//! Encryption at rest: the key file (`file.rs`), sealing and page names (`ring.rs`), and the
//! handle the store, the bucket and exports share, which a key rotation reloads while the
//! daemon runs.
//!
//! With encryption on, every value kvsnap writes to its redb file or its bucket is sealed,
//! and pages are stored under keyed names; exported snapshot files are sealed on request
//! (`sealed_file`). Nothing here knows where blobs go: callers name the place.

pub mod file;
pub mod ring;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub use file::KeyFile;
pub use ring::{KeyRing, sealed_key_id};

/// Why keys cannot be used. Always a sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(pub String);

/// The keys of a running instance: the key file's ring, swapped whole when the file is
/// reloaded for a rotation.
pub struct Keys {
    path: PathBuf,
    ring: RwLock<Arc<KeyRing>>,
}

impl Keys {
    /// Reads the key file at `path` (see `KeyFile::read` for what is refused).
    pub fn load(path: &Path) -> Result<Arc<Keys>, KeyError> {
        let ring = KeyRing::new(&KeyFile::read(path)?)?;
        Ok(Arc::new(Keys {
            path: path.to_path_buf(),
            ring: RwLock::new(Arc::new(ring)),
        }))
    }

    /// The ring in use now.
    pub fn ring(&self) -> Arc<KeyRing> {
        self.ring.read().expect("never poisoned").clone()
    }

    /// Reads the key file again (a key was added to it) and uses it from now on; returns the
    /// current key's id. Refused when the file would name pages differently: stored pages
    /// would no longer be found under their names.
    pub fn reload(&self) -> Result<String, KeyError> {
        let fresh = KeyRing::new(&KeyFile::read(&self.path)?)?;
        if fresh.page_ids_check() != self.ring().page_ids_check() {
            return Err(KeyError(format!(
                "the key file {} now has another page_ids key; it must never change while \
                 anything is stored with it",
                self.path.display()
            )));
        }
        let current = fresh.current().to_string();
        *self.ring.write().expect("never poisoned") = Arc::new(fresh);
        Ok(current)
    }
}

/// Sealed snapshot files (exports made with `?sealed=true`) start with this: `\x02` files name
/// their conversation's owner, `\x01` files (older) do not.
pub const SEALED_FILE_MAGIC: [u8; 8] = *b"KVSNAPE\x02";
const SEALED_FILE_MAGIC_V1: [u8; 8] = *b"KVSNAPE\x01";
const SEALED_FILE_PLACE_V1: &[u8] = b"kvsnap sealed snapshot file v1";
const SEALED_FILE_PLACE: &[u8] = b"kvsnap sealed snapshot file v2, owner: ";

/// A sealed file's parts: the owner it names (`Some(None)`: nobody's; `None`: a v1 file, which
/// says nothing) and the sealed blob.
pub struct SealedFile<'a> {
    pub owner: Option<Option<&'a str>>,
    pub sealed: &'a [u8],
}

/// `file` (a snapshot file) sealed with the current key, for an export. The owner's key hash
/// travels in the clear beside it and is bound to it (associated data): the file opens only as
/// that owner's, so a sealed export obtained by another key is no way into the conversation.
pub fn sealed_file(ring: &KeyRing, file: &[u8], owner: Option<&str>) -> Vec<u8> {
    let owner = owner.unwrap_or("").as_bytes();
    debug_assert!(owner.len() < 256, "an owner is a key hash");
    let mut out = SEALED_FILE_MAGIC.to_vec();
    out.push(owner.len() as u8);
    out.extend_from_slice(owner);
    out.extend_from_slice(&ring.seal(&[SEALED_FILE_PLACE, owner].concat(), file));
    out
}

/// Whether `bytes` is a sealed snapshot file.
pub fn is_sealed_file(bytes: &[u8]) -> bool {
    bytes.starts_with(&SEALED_FILE_MAGIC) || bytes.starts_with(&SEALED_FILE_MAGIC_V1)
}

/// The parts of a sealed file, unchecked (the seal checks them when it opens).
pub fn sealed_parts(bytes: &[u8]) -> Result<SealedFile<'_>, KeyError> {
    if let Some(sealed) = bytes.strip_prefix(&SEALED_FILE_MAGIC_V1[..]) {
        return Ok(SealedFile {
            owner: None,
            sealed,
        });
    }
    let rest = bytes
        .strip_prefix(&SEALED_FILE_MAGIC[..])
        .ok_or_else(|| KeyError("it is not a sealed snapshot file".into()))?;
    let (&length, rest) = rest
        .split_first()
        .ok_or_else(|| KeyError("the sealed snapshot file is cut short".into()))?;
    let owner = rest
        .get(..length as usize)
        .and_then(|o| std::str::from_utf8(o).ok())
        .ok_or_else(|| KeyError("the sealed snapshot file's owner is unreadable".into()))?;
    Ok(SealedFile {
        owner: Some((!owner.is_empty()).then_some(owner)),
        sealed: &rest[length as usize..],
    })
}

/// The snapshot file inside a sealed one, and the owner the file names (see `SealedFile`).
pub fn open_sealed_file(
    ring: &KeyRing,
    bytes: &[u8],
) -> Result<(Vec<u8>, Option<Option<String>>), KeyError> {
    let parts = sealed_parts(bytes)?;
    let place = match parts.owner {
        None => SEALED_FILE_PLACE_V1.to_vec(),
        Some(owner) => [SEALED_FILE_PLACE, owner.unwrap_or("").as_bytes()].concat(),
    };
    let file = ring
        .open(&place, parts.sealed)
        .map_err(|e| KeyError(format!("the sealed snapshot file cannot be opened: {e}")))?;
    Ok((file, parts.owner.map(|o| o.map(str::to_string))))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_reload_picks_up_a_rotation_and_refuses_another_page_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let mut file = KeyFile::generate().unwrap();
        file.write(&path, false).unwrap();
        let keys = Keys::load(&path).unwrap();
        let export = sealed_file(&keys.ring(), b"snapshot", Some("abc"));
        assert!(is_sealed_file(&export));

        file.rotate().unwrap();
        file.write(&path, true).unwrap();
        assert_eq!(keys.reload().unwrap(), "k2");
        assert_eq!(keys.ring().current(), "k2");
        let (opened, owner) = open_sealed_file(&keys.ring(), &export).unwrap();
        assert_eq!(opened, b"snapshot");
        assert_eq!(owner, Some(Some("abc".to_string())));
        // The owner is bound to the file: naming another opens nothing.
        let mut renamed = export.clone();
        renamed[9] = b'x';
        assert!(open_sealed_file(&keys.ring(), &renamed).is_err());

        std::fs::remove_file(&path).unwrap();
        KeyFile::generate().unwrap().write(&path, false).unwrap();
        assert!(keys.reload().unwrap_err().0.contains("page_ids"));
        assert_eq!(keys.ring().current(), "k2", "the old ring stays in use");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Keys::load(&path).is_err());
    }
}
