//! The key file `--encryption-key-file` names: reading it (only when no one but its owner can
//! read it), and writing a new one or a rotated one.
//!
//! ```toml
//! # kvsnap encryption keys: owner-only (chmod 600). Back it up: without it nothing
//! # kvsnap stored can be read.
//! page_ids = "64 hex digits"   # names pages; never changes for a store's life
//! current = "k2"               # seals what is written from now on
//! [keys]
//! k1 = "64 hex digits"         # still opens what k1 sealed until `kvsnap rekey` has run
//! k2 = "64 hex digits"
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::KeyError;

/// 32 secret bytes.
pub type Secret = Zeroizing<[u8; 32]>;

/// A key file's contents, checked.
pub struct KeyFile {
    pub page_ids: Secret,
    pub current: String,
    pub keys: BTreeMap<String, Secret>,
}

/// The file as TOML has it.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Text {
    page_ids: String,
    current: String,
    keys: BTreeMap<String, String>,
}

const HEADER: &str = "# kvsnap encryption keys: keep this file owner-only (chmod 600) and back it up;\n\
# without it nothing kvsnap stored can be read. `page_ids` names pages and never changes\n\
# for a store's life; `current` seals what is written from now on; the other keys still\n\
# open what they sealed until `kvsnap rekey` has run. `kvsnap keys rotate` adds a key.\n";

impl KeyFile {
    /// Reads and checks `path`: refused unless only its owner may read or write it.
    pub fn read(path: &Path) -> Result<KeyFile, KeyError> {
        let shown = path.display();
        let meta = std::fs::metadata(path)
            .map_err(|e| KeyError(format!("cannot read the key file {shown}: {e}")))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError(format!(
                "the key file {shown} may be read by others (mode {mode:o}); make it \
                 owner-only with `chmod 600 {shown}`"
            )));
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| KeyError(format!("cannot read the key file {shown}: {e}")))?,
        );
        let parsed: Text = toml::from_str(&text)
            .map_err(|e| KeyError(format!("the key file {shown} is not valid: {e}")))?;
        let page_ids = secret(&parsed.page_ids)
            .map_err(|why| KeyError(format!("the key file {shown}: page_ids {why}")))?;
        let mut keys = BTreeMap::new();
        for (id, hex) in &parsed.keys {
            check_key_id(id).map_err(|why| KeyError(format!("the key file {shown}: {why}")))?;
            let key = secret(hex)
                .map_err(|why| KeyError(format!("the key file {shown}: key {id:?} {why}")))?;
            keys.insert(id.clone(), key);
        }
        if !keys.contains_key(&parsed.current) {
            return Err(KeyError(format!(
                "the key file {shown} names current = {:?}, which is not among its [keys]",
                parsed.current
            )));
        }
        Ok(KeyFile {
            page_ids,
            current: parsed.current,
            keys,
        })
    }

    /// A new file's contents: fresh random keys, `k1` current.
    pub fn generate() -> Result<KeyFile, KeyError> {
        let mut keys = BTreeMap::new();
        keys.insert("k1".to_string(), random_secret()?);
        Ok(KeyFile {
            page_ids: random_secret()?,
            current: "k1".into(),
            keys,
        })
    }

    /// Adds a fresh key, named one past the highest `kN`, and makes it current; returns its id.
    pub fn rotate(&mut self) -> Result<String, KeyError> {
        let next = self
            .keys
            .keys()
            .filter_map(|id| id.strip_prefix('k')?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let id = format!("k{next}");
        self.keys.insert(id.clone(), random_secret()?);
        self.current = id.clone();
        Ok(id)
    }

    /// Writes the file owner-only (0600). `replace` false refuses an existing file; true
    /// replaces it atomically (a new file renamed over it, so a crash leaves one whole file).
    pub fn write(&self, path: &Path, replace: bool) -> Result<(), KeyError> {
        let shown = path.display();
        let text = Text {
            page_ids: hex::encode(*self.page_ids),
            current: self.current.clone(),
            keys: self
                .keys
                .iter()
                .map(|(id, key)| (id.clone(), hex::encode(**key)))
                .collect(),
        };
        let body = Zeroizing::new(format!(
            "{HEADER}{}",
            toml::to_string(&text).expect("a key file always serializes")
        ));
        let fail = |e: std::io::Error| KeyError(format!("cannot write the key file {shown}: {e}"));
        let staging = path.with_extension("new");
        let target = if replace { staging.as_path() } else { path };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(target)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyError(format!(
                        "{} exists already; kvsnap never overwrites a key file",
                        target.display()
                    ))
                } else {
                    fail(e)
                }
            })?;
        file.write_all(body.as_bytes()).map_err(fail)?;
        file.sync_all().map_err(fail)?;
        if replace {
            std::fs::rename(&staging, path).map_err(fail)?;
        }
        Ok(())
    }
}

/// Key ids are short and plain: they are stored beside every sealed blob.
fn check_key_id(id: &str) -> Result<(), String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if id.is_empty() || id.len() > 64 || !id.chars().all(plain) {
        return Err(format!(
            "key id {id:?} must be 1 to 64 letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

fn secret(hex_text: &str) -> Result<Secret, String> {
    let mut out = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(hex_text.trim(), out.as_mut_slice())
        .map_err(|_| "must be 64 hex digits (32 bytes)".to_string())?;
    Ok(out)
}

fn random_secret() -> Result<Secret, KeyError> {
    let mut out = Zeroizing::new([0u8; 32]);
    getrandom::fill(out.as_mut_slice())
        .map_err(|e| KeyError(format!("the system's random source failed: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_reads_back_and_rotation_keeps_the_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let mut file = KeyFile::generate().unwrap();
        file.write(&path, false).unwrap();
        assert!(
            file.write(&path, false).is_err(),
            "never overwritten unasked"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let read = KeyFile::read(&path).unwrap();
        assert_eq!(*read.page_ids, *file.page_ids);
        assert_eq!(read.current, "k1");

        assert_eq!(file.rotate().unwrap(), "k2");
        file.write(&path, true).unwrap();
        let read = KeyFile::read(&path).unwrap();
        assert_eq!(read.current, "k2");
        assert_eq!(read.keys.len(), 2);
        assert_eq!(*read.keys["k1"], *file.keys["k1"]);
        assert_eq!(*read.page_ids, *file.page_ids, "page ids never rotate");
    }

    #[test]
    fn a_file_others_may_read_is_refused_with_the_command_that_fixes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        KeyFile::generate().unwrap().write(&path, false).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let refused = KeyFile::read(&path).err().unwrap().to_string();
        assert!(refused.contains("chmod 600"), "{refused}");
    }

    #[test]
    fn bad_contents_are_refused_with_a_sentence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let write = |text: &str| {
            let _ = std::fs::remove_file(&path);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        };
        let key = "ab".repeat(32);
        write(&format!(
            "page_ids = \"{key}\"\ncurrent = \"k9\"\n[keys]\nk1 = \"{key}\"\n"
        ));
        assert!(KeyFile::read(&path).err().unwrap().0.contains("k9"));
        write(&format!(
            "page_ids = \"abc\"\ncurrent = \"k1\"\n[keys]\nk1 = \"{key}\"\n"
        ));
        assert!(KeyFile::read(&path).err().unwrap().0.contains("64 hex"));
        write(&format!(
            "page_ids = \"{key}\"\ncurrent = \"a b\"\n[keys]\n\"a b\" = \"{key}\"\n"
        ));
        assert!(KeyFile::read(&path).err().unwrap().0.contains("key id"));
    }
}
