//! Stored responses of OpenAI's Responses API. A response's conversation state is the named
//! conversation of the same id (forked from the response it continued, so both go on
//! independently); its record here holds the conversation's text and what `GET` answers.
//! A response belongs to the key that made it: to any other it does not exist. In a fleet the
//! bucket holds every response too, so any member continues one another answered.

use uuid::Uuid;

use super::error::ConversationError;
use super::{Conversations, blocking};
use crate::engine::Requester;
use crate::store::records::ResponseRecord;

/// "No such response", in the API's own spelling of its id.
fn unknown(id: Uuid) -> ConversationError {
    ConversationError::NotFound(format!("there is no response resp_{}", id.simple()))
}

impl Conversations {
    /// The stored response `id`, if `requester` may read it.
    pub async fn response(
        &self,
        id: Uuid,
        requester: &Requester,
    ) -> Result<ResponseRecord, ConversationError> {
        let store = self.store.clone();
        let mut found = blocking(move || Ok(store.response(id)?)).await?;
        // A response another member of the fleet answered is in the bucket.
        if found.is_none()
            && let Some(fleet) = &self.fleet
        {
            found = fleet.fetch_response(id).await?;
        }
        match found {
            Some(record) if requester.may_use(&record.owner) => Ok(record),
            _ => Err(unknown(id)),
        }
    }

    /// Keeps a response, committed before this returns.
    pub async fn keep_response(
        &self,
        id: Uuid,
        record: ResponseRecord,
    ) -> Result<(), ConversationError> {
        let store = self.store.clone();
        blocking(move || Ok(store.put_response(id, &record)?)).await?;
        if let Some(fleet) = &self.fleet {
            fleet.keep_response(id).await?;
        }
        Ok(())
    }

    /// Deletes a response and its conversation state (which may be gone already).
    pub async fn delete_response(
        &self,
        id: Uuid,
        requester: Requester,
    ) -> Result<(), ConversationError> {
        self.response(id, &requester).await?;
        match self.delete(id, requester).await {
            Ok(()) | Err(ConversationError::NotFound(_)) => {}
            Err(other) => return Err(other),
        }
        // The bucket's copy first: while it is there another member could fetch it back.
        if let Some(fleet) = &self.fleet {
            fleet.delete_response(id).await?;
        }
        let store = self.store.clone();
        blocking(move || Ok(store.delete_response(id)?)).await?;
        Ok(())
    }
}
