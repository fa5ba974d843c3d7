//! Retention: a TTL index on `deliveredAt` does the bulk; a leased sweep removes what TTL
//! cannot see (delivered messages without `deliveredAt`, TTL-monitor lag) and, only when
//! `MSGBUF_UNDELIVERED_MAX_AGE` is set, undelivered messages older than that.
//!
//! Every instance runs the loop; a lease document in `leases` lets one instance at a time
//! run a sweep. The lease is held for half the interval, so a sweep is not repeated by a
//! second instance right after the first.

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::IndexOptions;
use mongodb::IndexModel;

use crate::server::AppState;
use crate::store::{Store, StoreError, LEASES, TTL_INDEX};

const LEASE_ID: &str = "cleanup";

/// Creates the TTL index, or changes its `expireAfterSeconds` in place with `collMod`.
pub async fn ensure_ttl_index(store: &Store, retention: Duration) -> Result<(), StoreError> {
    let seconds = retention.as_secs().max(1) as i64;
    let mut existing = None;
    let mut cursor = store.raw().list_indexes().await?;
    while let Some(index) = cursor.try_next().await? {
        if index.options.as_ref().and_then(|o| o.name.as_deref()) == Some(TTL_INDEX) {
            existing = Some(
                index
                    .options
                    .and_then(|o| o.expire_after)
                    .map(|d| d.as_secs() as i64),
            );
        }
    }
    match existing {
        None => {
            let model = IndexModel::builder()
                .keys(doc! {"deliveredAt": 1})
                .options(
                    IndexOptions::builder()
                        .name(TTL_INDEX.to_owned())
                        .expire_after(Duration::from_secs(seconds as u64))
                        .build(),
                )
                .build();
            store.raw().create_index(model).await?;
            tracing::info!(
                expire_after_seconds = seconds,
                "created TTL index on deliveredAt"
            );
        }
        Some(Some(current)) if current == seconds => {}
        Some(current) => {
            store
                .database()
                .run_command(doc! {
                    "collMod": crate::store::MESSAGES,
                    "index": {"name": TTL_INDEX, "expireAfterSeconds": seconds},
                })
                .await?;
            tracing::info!(from = ?current, to = seconds, "changed the TTL index retention with collMod");
        }
    }
    Ok(())
}

/// Outcome of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sweep {
    /// This instance held the lease and swept.
    Ran { delivered: u64, undelivered: u64 },
    /// Another instance holds the lease.
    Skipped,
}

/// Tries to take the lease and sweep once.
pub async fn try_sweep(state: &AppState) -> Result<Sweep, StoreError> {
    let config = &state.config;
    let lease = (config.cleanup_interval / 2).max(Duration::from_secs(1));
    if !acquire_lease(&state.store, &state.instance, lease).await? {
        return Ok(Sweep::Skipped);
    }
    let now = DateTime::now().timestamp_millis();
    let cutoff = DateTime::from_millis(now - config.retention.as_millis() as i64);
    let raw = state.store.raw();
    let delivered = raw
        .delete_many(doc! {"delivered": true, "$or": [
            {"deliveredAt": {"$lt": cutoff}},
            {"deliveredAt": {"$exists": false}, "timestamp": {"$lt": cutoff}},
        ]})
        .await?
        .deleted_count;
    let undelivered = match config.undelivered_max_age {
        Some(age) => {
            let cutoff = DateTime::from_millis(now - age.as_millis() as i64);
            raw.delete_many(doc! {"delivered": false, "timestamp": {"$lt": cutoff}})
                .await?
                .deleted_count
        }
        None => 0,
    };
    let m = &state.metrics;
    m.cleanup_sweeps.increment(1);
    m.cleanup_deleted_delivered.increment(delivered);
    m.cleanup_deleted_undelivered.increment(undelivered);
    tracing::info!(
        delivered,
        undelivered,
        "cleanup sweep removed expired messages"
    );
    Ok(Sweep::Ran {
        delivered,
        undelivered,
    })
}

/// Takes the lease if it is free or expired (or already ours).
async fn acquire_lease(store: &Store, instance: &str, hold: Duration) -> Result<bool, StoreError> {
    let leases = store.database().collection::<Document>(LEASES);
    let now = DateTime::now();
    let until = DateTime::from_millis(now.timestamp_millis() + hold.as_millis() as i64);
    let result = leases
        .update_one(
            doc! {"_id": LEASE_ID, "$or": [{"until": {"$lt": now}}, {"holder": instance}]},
            doc! {"$set": {"holder": instance, "until": until, "takenAt": now}},
        )
        .upsert(true)
        .write_concern(mongodb::options::WriteConcern::majority())
        .await;
    match result {
        Ok(r) => Ok(r.matched_count == 1 || r.upserted_id.is_some()),
        // The upsert collided with a live lease of another instance.
        Err(e) if matches!(e.kind.as_ref(), mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) if w.code == 11000) => {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// The cleanup loop: first run after `MSGBUF_CLEANUP_FIRST_RUN`, then every interval.
pub async fn run(state: Arc<AppState>) {
    let cancel = state.shutdown.clone();
    let mut wait = state.config.cleanup_first_run;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = state.config.cleanup_interval;
        match try_sweep(&state).await {
            Ok(Sweep::Skipped) => tracing::debug!("cleanup lease held by another instance"),
            Ok(Sweep::Ran { .. }) => {}
            Err(e) => tracing::warn!(error = %e, "cleanup sweep failed; retrying next interval"),
        }
    }
}
