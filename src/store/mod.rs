//! The MongoDB side of msgbuf: the `buffered_messages` collection and the bookkeeping
//! collections, and every query msgbuf runs on them.
//!
//! Inserts and claims use majority write concern and reads use majority read concern
//! (set once on the collection handle), so nothing acknowledged can be rolled back by a
//! failover and no drain sees a write that could be.
//!
//! One file per noun: [`message`] (the document), [`error`] (error classes and the server's
//! error codes), [`indexes`], [`writes`] (sends, claims, acks, re-sends), [`pending`] (what a
//! join drains: two index-ordered cursors merged), [`reads`] (sweeps, pages, counts),
//! [`changes`] (the change stream and its checkpoints), [`devices`] (each device's catch-up
//! state), [`retention`] (the cleanup's lease
//! and deletes).

mod changes;
mod devices;
mod error;
mod indexes;
mod message;
mod pending;
mod reads;
mod retention;
mod writes;

use mongodb::bson::Document;
use mongodb::options::{CollectionOptions, ReadConcern, WriteConcern};
use mongodb::{Collection, Database};

pub use changes::{is_history_lost, MessageChanges};
pub use devices::{Catchup, DeviceBounds, DevicePolicy, DEVICES};
pub use error::StoreError;
pub use indexes::TTL_INDEX;
pub use message::{overdue_cutoff, BufferedMessage};
pub use pending::{CatchUpSource, Pending, Reader};
pub use reads::Receivers;

pub const MESSAGES: &str = "buffered_messages";
pub const CHECKPOINTS: &str = "stream_checkpoints";
pub const LEASES: &str = "leases";

/// Handle to the collections; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Database,
    /// Typed, for reads that decode whole messages.
    messages: Collection<BufferedMessage>,
    /// Untyped, for writes and counts (no decode of what they do not return).
    raw: Collection<Document>,
    /// Each device's catch-up state ([`devices`]).
    devices: Collection<Document>,
}

impl Store {
    pub fn new(db: Database) -> Self {
        let options = CollectionOptions::builder()
            .write_concern(WriteConcern::majority())
            .read_concern(ReadConcern::majority())
            .build();
        let messages = db.collection_with_options::<BufferedMessage>(MESSAGES, options.clone());
        let raw = messages.clone_with_type::<Document>();
        let devices = db.collection_with_options::<Document>(DEVICES, options);
        Store {
            db,
            messages,
            raw,
            devices,
        }
    }

    /// Answers when MongoDB does (`/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.run_command(mongodb::bson::doc! {"ping": 1}).await?;
        Ok(())
    }
}
