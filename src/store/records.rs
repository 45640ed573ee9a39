//! Stored records. These are not domain types: each carries its own version, and a change to
//! one is a new version plus a migration.

use serde::{Deserialize, Serialize};

pub const RECORD_VERSION: u32 = 1;

/// What the store knows about a conversation besides its snapshot bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub record_version: u32,
    /// blake3 of the API key that created it; `None` when auth was off.
    pub owner: Option<String>,
    pub created_ms: u64,
    pub last_used_ms: u64,
    pub tokens: u64,
    /// Length of the stored snapshot file.
    pub bytes: u64,
    pub chunks: u32,
    /// blake3 of the snapshot file, checked when it is read back.
    pub checksum: String,
    /// blake3 of the model file that wrote it.
    pub model: String,
    /// Set when a restore found the snapshot unusable; the record is kept for inspection.
    pub damaged: Option<String>,
    /// The compute profile of the build that wrote the snapshot (`None`: unknown). Added
    /// without a version step: records written before it read as `None`, which is what they
    /// are, and older builds ignore the field.
    #[serde(default)]
    pub compute_profile: Option<String>,
    /// How many times this conversation's turns were saved, counting its whole history: a copy
    /// with a higher count is newer. The fleet compares it, so a store restored from a backup
    /// never uploads its older copy over the bucket's newer one. Added without a version step:
    /// records written before it read as 0 (older than any counted save).
    #[serde(default)]
    pub saves: u64,
}

impl SessionRecord {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a SessionRecord always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(bytes)
    }
}

/// A conversation that moved to another instance: requests for it here are sent there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardRecord {
    pub record_version: u32,
    /// The base URL of the instance that now holds it, e.g. `http://10.0.0.2:8080`.
    pub target: String,
    pub moved_ms: u64,
}

impl ForwardRecord {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a ForwardRecord always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(bytes)
    }
}

/// A conversation on its way here from another instance, page by page: what its source
/// offered. Its pages wait beside it (`tables::INCOMING_PAGES`) until it is committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncomingRecord {
    pub record_version: u32,
    pub owner: Option<String>,
    pub created_ms: u64,
    /// blake3 of the snapshot file the manifest and pages assemble to.
    pub checksum: String,
    #[serde(with = "serde_bytes")]
    pub manifest: Vec<u8>,
    /// When the source last offered it; offers left longer than a day are dropped.
    pub offered_ms: u64,
}

impl IncomingRecord {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("an IncomingRecord always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(bytes)
    }
}

/// One entry of the audit trail: an admin action, who took it, on what, and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub record_version: u32,
    pub at_ms: u64,
    /// Who acted: `key:` and the blake3 of the key presented (never the key), `open` when the
    /// API has no keys, or `instance:` and an instance id for what an instance does on its own
    /// (a lease taken over, a move a migration job made).
    pub actor: String,
    /// What was done, one word: `import`, `migrate`, `move`, `delete`, `lease_takeover`, ...
    pub action: String,
    /// What it was done to: a conversation id, or the request's path when it names none.
    pub target: String,
    /// `ok`, or the HTTP status and error sentence it ended with.
    pub outcome: String,
    /// What else the action needs said: where a conversation went, whose lease was taken.
    #[serde(default)]
    pub detail: Option<String>,
}

impl AuditRecord {
    /// An entry for an action that ended just now.
    pub fn now(actor: String, action: &str, target: String, outcome: String) -> Self {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        AuditRecord {
            record_version: RECORD_VERSION,
            at_ms,
            actor,
            action: action.to_string(),
            target,
            outcome,
            detail: None,
        }
    }

    pub fn with_detail(self, detail: String) -> Self {
        AuditRecord {
            detail: Some(detail),
            ..self
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("an AuditRecord always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(bytes)
    }
}

/// An unnamed entry: the state of a conversation no client named (an anonymous request's
/// turn), kept so a later request that starts with its tokens resumes it. Immutable: a
/// longer conversation is a new entry. Its manifest and page list are stored like a named
/// conversation's, under its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryRecord {
    pub record_version: u32,
    /// The key whose requests may resume it (`None`: requests without a key).
    pub owner: Option<String>,
    pub created_ms: u64,
    pub last_used_ms: u64,
    /// How many tokens its state holds.
    pub tokens: u64,
    /// `sessions::lookup`'s hash of all its tokens (salted with the owner and the model):
    /// a request's prefix of `tokens` tokens is this entry's when it hashes the same.
    #[serde(with = "serde_bytes")]
    pub tokens_hash: Vec<u8>,
    /// blake3 of the model file that wrote it.
    pub model: String,
    /// A checkpoint: the state a cold start of its tokens reaches (prompt tokens only, cut at
    /// the prefix grid and laid out as restored at each boundary), so a new conversation may
    /// start from it. Otherwise the state a turn left (its reply decoded token by token), which
    /// only a request continuing that conversation may resume.
    #[serde(default)]
    pub checkpoint: bool,
    /// The plain name it is indexed under (`sessions::lookup::index_name`), so a copy of it
    /// (in the fleet's bucket, or fetched from there) is indexed under the same name. Empty in
    /// entries kept before entries went to the bucket; those stay on their instance.
    #[serde(default, with = "serde_bytes")]
    pub index: Vec<u8>,
}

impl EntryRecord {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("an EntryRecord always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(bytes)
    }
}

/// A stored response of OpenAI's Responses API: what `GET /v1/responses/{id}` answers and what a
/// later request naming it as `previous_response_id` continues. Its conversation state is the
/// named conversation of the same id; this record holds the conversation's text, so the next
/// turn's prompt is rendered whole and matched against that state by its tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseRecord {
    pub record_version: u32,
    /// blake3 of the API key that made it; `None` when auth was off.
    pub owner: Option<String>,
    pub created_ms: u64,
    /// The model name the response was answered with.
    pub model: String,
    /// This request's instructions (they do not carry over to a response that continues it).
    pub instructions: Option<String>,
    /// The response this one continued (`resp_…`).
    pub previous: Option<String>,
    /// The conversation through this response's reply: (role, text), instructions left out.
    pub history: Vec<(String, String)>,
    /// How many of `history`'s messages were this request's own input.
    pub input_messages: u32,
    /// `completed`, or `incomplete` with its reason (`max_output_tokens`).
    pub status: String,
    pub incomplete_reason: Option<String>,
    pub input_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
}

impl ResponseRecord {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a ResponseRecord always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(bytes)
    }

    /// The reply's text: the last message of the history.
    pub fn output(&self) -> &str {
        self.history.last().map_or("", |(_, text)| text.as_str())
    }
}
