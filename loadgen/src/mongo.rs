//! MongoDB without msgbuf: a client for the replica set, and msgbuf's collection as the
//! README documents it (`buffered_messages`: fields, indexes, the change-stream filter),
//! rebuilt here with the driver so the floor measures MongoDB alone and does not move
//! when msgbuf's query code does.

use std::time::Duration;

use anyhow::{bail, Context};
use mongodb::bson::{doc, oid::ObjectId, DateTime, Document};
use mongodb::options::{ClientOptions, CollectionOptions, IndexOptions, ReadConcern, WriteConcern};
use mongodb::{Client, Collection, Database, IndexModel};

/// The collection msgbuf buffers messages in (README, "Collection `buffered_messages`").
pub const MESSAGES: &str = "buffered_messages";

/// A client for the replica set at `uri`; fails unless it answers and is a set member
/// (the floor needs change streams).
pub async fn connect(uri: &str) -> anyhow::Result<Client> {
    let mut options = ClientOptions::parse(uri)
        .await
        .context("parsing the MongoDB URI")?;
    options.app_name = Some("msgbuf-loadgen".into());
    options
        .server_selection_timeout
        .get_or_insert(Duration::from_secs(15));
    let client = Client::with_options(options)?;
    let hello = client
        .database("admin")
        .run_command(doc! {"hello": 1})
        .await
        .context("MongoDB did not answer `hello`")?;
    if hello.get_str("setName").is_err() {
        bail!("MongoDB is not a replica set member: change streams need one");
    }
    Ok(client)
}

/// The messages collection of `db` with msgbuf's write and read concerns (majority).
pub fn messages(db: &Database) -> Collection<Document> {
    let options = CollectionOptions::builder()
        .write_concern(WriteConcern::majority())
        .read_concern(ReadConcern::majority())
        .build();
    db.collection_with_options(MESSAGES, options)
}

/// An undelivered message as msgbuf stores it on `chat_message`: the same fields, so
/// inserts cost what msgbuf's cost (document size, index keys).
pub fn new_message(
    sender: &str,
    receiver: &str,
    chat: &str,
    text: &str,
    client_msg_id: &str,
) -> Document {
    let now = DateTime::now();
    doc! {
        "_id": ObjectId::new(),
        "receiver": receiver,
        "sender": sender,
        "chatId": chat,
        "message": text,
        "timestamp": now,
        "delivered": false,
        "clientMsgId": client_msg_id,
        "redeliveries": 0,
        "updatedAt": now,
    }
}

/// The indexes msgbuf keeps on the collection (README), less the TTL index, which
/// undelivered messages never enter.
pub async fn create_indexes(messages: &Collection<Document>) -> anyhow::Result<()> {
    let index = |keys: Document, name: &str, options: IndexOptions| {
        let mut options = options;
        options.name = Some(name.to_owned());
        IndexModel::builder().keys(keys).options(options).build()
    };
    let plain = IndexOptions::default;
    let models = vec![
        index(doc! {"receiver": 1}, "receiver_1", plain()),
        index(doc! {"delivered": 1}, "delivered_1", plain()),
        index(
            doc! {"receiver": 1, "delivered": 1},
            "receiver_1_delivered_1",
            plain(),
        ),
        index(
            doc! {"receiver": 1, "delivered": 1, "_id": 1},
            "receiver_1_delivered_1__id_1",
            plain(),
        ),
        index(
            doc! {"delivered": 1, "_id": 1},
            "delivered_1__id_1",
            plain(),
        ),
        index(
            doc! {"receiver": 1, "_id": 1},
            "receiver_1__id_1_unacked",
            IndexOptions::builder()
                .partial_filter_expression(doc! {"delivered": true, "ackedAt": {"$type": "null"}})
                .build(),
        ),
        index(
            doc! {"sender": 1, "clientMsgId": 1},
            "sender_1_clientMsgId_1",
            IndexOptions::builder()
                .unique(true)
                .partial_filter_expression(doc! {"clientMsgId": {"$type": "string"}})
                .build(),
        ),
    ];
    messages.create_indexes(models).await?;
    Ok(())
}

/// The change-stream filter of an instance: inserts (to push) and the updates that carry
/// an ack's `receiptFor` (to send receipts); the server evaluates it on every oplog entry.
pub fn stream_pipeline() -> Vec<Document> {
    vec![doc! {"$match": {"$or": [
        {"operationType": "insert"},
        {"operationType": "update", "updateDescription.updatedFields.receiptFor": {"$exists": true}},
    ]}}]
}
