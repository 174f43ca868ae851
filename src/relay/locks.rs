//! The relay's share of PostgreSQL's shared lock table. Its aggregate locks
//! are session advisory locks, which live in the one table every lock on the
//! cluster shares: filled, it stops every write on the cluster, not only
//! outboxd's. So a relay whose settings could take too much of it refuses to start.

use tokio_postgres::Client;

use crate::config::Invalid;

/// Aggregate locks a worker may hold per row of `relay.batch_size`: a claim
/// locks up to a batch of aggregates for its retries and as many for its new
/// rows, and keeps them until the batch is done.
pub const LOCKS_PER_BATCH_ROW: i64 = 2;

/// One relay may take at most 1/SHARE of the lock table, so that a second
/// relay and the cluster's own locks still fit.
pub const SHARE: i64 = 2;

/// The server settings that size the shared lock table.
#[derive(Debug, Clone, Copy)]
pub struct LockTable {
    pub max_locks_per_transaction: i64,
    pub max_connections: i64,
    pub max_prepared_transactions: i64,
}

impl LockTable {
    pub async fn read(client: &Client) -> Result<LockTable, tokio_postgres::Error> {
        let row = client
            .query_one(
                "SELECT pg_catalog.current_setting('max_locks_per_transaction')::int8,
                        pg_catalog.current_setting('max_connections')::int8,
                        pg_catalog.current_setting('max_prepared_transactions')::int8",
                &[],
            )
            .await?;
        Ok(LockTable {
            max_locks_per_transaction: row.get(0),
            max_connections: row.get(1),
            max_prepared_transactions: row.get(2),
        })
    }

    /// Entries in the table, as PostgreSQL's documentation counts them (the
    /// server adds a few for its background processes).
    pub fn entries(&self) -> i64 {
        self.max_locks_per_transaction * (self.max_connections + self.max_prepared_transactions)
    }
}

/// The most advisory locks a relay with these settings holds at once.
pub fn relay_locks(workers: usize, batch_size: i64) -> i64 {
    (workers as i64)
        .saturating_mul(batch_size)
        .saturating_mul(LOCKS_PER_BATCH_ROW)
}

/// This relay's locks at most, or the configuration error naming the settings,
/// their numbers and what to lower, when they exceed its share of the table.
pub fn check(table: &LockTable, workers: usize, batch_size: i64) -> Result<i64, Invalid> {
    let locks = relay_locks(workers, batch_size);
    let allowed = table.entries() / SHARE;
    if locks <= allowed {
        return Ok(locks);
    }
    let per_row = LOCKS_PER_BATCH_ROW;
    let max_batch = allowed / (per_row * workers as i64);
    let max_workers = allowed / (per_row * batch_size);
    let lower = match (max_batch, max_workers) {
        (0, 0) => "raise max_locks_per_transaction".to_owned(),
        (0, w) => format!("lower relay.workers to at most {w}"),
        (b, 0) => format!("lower relay.batch_size to at most {b}"),
        (b, w) => format!("lower relay.batch_size to at most {b} or relay.workers to at most {w}"),
    };
    Err(Invalid(format!(
        "invalid configuration: relay.workers ({workers}) × relay.batch_size ({batch_size}) \
         lets this relay hold up to {locks} advisory locks ({per_row} per batch row per worker), \
         more than 1/{SHARE} of PostgreSQL's shared lock table: max_locks_per_transaction ({}) × \
         (max_connections ({}) + max_prepared_transactions ({})) = {} entries; a full lock table \
         stops every write on the cluster: {lower}, or raise max_locks_per_transaction on the server",
        table.max_locks_per_transaction,
        table.max_connections,
        table.max_prepared_transactions,
        table.entries(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: LockTable = LockTable {
        max_locks_per_transaction: 64,
        max_connections: 100,
        max_prepared_transactions: 0,
    };

    #[test]
    fn the_defaults_fit_and_the_largest_batch_does_not() {
        assert_eq!(check(&DEFAULTS, 2, 100).unwrap(), 400);
        // Exactly half of 6,400 fits.
        assert_eq!(check(&DEFAULTS, 2, 800).unwrap(), 3200);
        let err = check(&DEFAULTS, 2, 801).unwrap_err().0;
        assert!(
            err.contains("lower relay.batch_size to at most 800 or relay.workers to at most 1"),
            "{err}"
        );
        let err = check(&DEFAULTS, 1, 10_000).unwrap_err().0;
        assert!(
            err.contains("lower relay.batch_size to at most 1600,"),
            "{err}"
        );
        assert!(err.contains("= 6400 entries"), "{err}");
    }
}
