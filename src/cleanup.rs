//! Retention: a TTL index on `deliveredAt` does the bulk (kept in step with
//! `MSGBUF_RETENTION` by [`crate::store::Store::ensure_ttl_index`]); a leased sweep removes
//! what TTL cannot see (delivered messages without `deliveredAt`, TTL-monitor lag) and,
//! only when `MSGBUF_UNDELIVERED_MAX_AGE` is set, undelivered messages older than that.
//!
//! Every instance runs the loop; a lease document in `leases` lets one instance at a time
//! run a sweep. The lease is held for half the interval, so a sweep is not repeated by a
//! second instance right after the first.

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::DateTime;
use tokio_util::sync::CancellationToken;

use crate::delivery::Delivery;
use crate::error::Error;
use crate::state::AppState;

/// Outcome of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sweep {
    /// This instance held the lease and swept.
    Ran { delivered: u64, undelivered: u64 },
    /// Another instance holds the lease.
    Skipped,
}

/// The cleanup loop of one instance.
pub struct Cleanup {
    delivery: Arc<Delivery>,
    retention: Duration,
    undelivered_max_age: Option<Duration>,
    first_run: Duration,
    interval: Duration,
}

impl Cleanup {
    /// The cleanup of the instance whose state this is.
    pub fn new(state: &AppState) -> Self {
        let config = &state.config;
        Cleanup {
            delivery: state.delivery.clone(),
            retention: config.retention,
            undelivered_max_age: config.undelivered_max_age,
            first_run: config.cleanup_first_run,
            interval: config.cleanup_interval,
        }
    }

    /// First run after `MSGBUF_CLEANUP_FIRST_RUN`, then every interval, until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let mut wait = self.first_run;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = self.interval;
            match self.try_sweep().await {
                Ok(Sweep::Skipped) => tracing::debug!("cleanup lease held by another instance"),
                Ok(Sweep::Ran { .. }) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cleanup sweep failed; retrying next interval")
                }
            }
        }
    }

    /// Tries to take the lease and sweep once.
    pub async fn try_sweep(&self) -> Result<Sweep, Error> {
        let store = self.delivery.store();
        let lease = (self.interval / 2).max(Duration::from_secs(1));
        if !store
            .take_cleanup_lease(self.delivery.instance(), lease)
            .await?
        {
            return Ok(Sweep::Skipped);
        }
        let delivered = store.delete_delivered_before(ago(self.retention)).await?;
        let undelivered = match self.undelivered_max_age {
            Some(age) => store.delete_undelivered_before(ago(age)).await?,
            None => 0,
        };
        let m = self.delivery.metrics();
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
}

fn ago(age: Duration) -> DateTime {
    DateTime::from_millis(DateTime::now().timestamp_millis() - age.as_millis() as i64)
}
