//! The retry policy (exponential, jittered, capped backoff) and the one place that decides
//! whether a PostgreSQL error is worth retrying. The backoff crate stays behind this module so
//! it can be swapped.

use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::{ExponentialBackoff, ExponentialBackoffBuilder};
use tokio_postgres::error::SqlState;

/// Delays between attempts to reconnect or re-apply.
pub struct RetryPolicy {
    backoff: ExponentialBackoff,
}

impl RetryPolicy {
    /// From 200 ms, doubling with jitter, capped at 30 s, forever: the caller decides when
    /// to give up.
    pub fn new() -> RetryPolicy {
        RetryPolicy {
            backoff: ExponentialBackoffBuilder::new()
                .with_initial_interval(Duration::from_millis(200))
                .with_max_interval(Duration::from_secs(30))
                .with_max_elapsed_time(None)
                .build(),
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        self.backoff
            .next_backoff()
            .unwrap_or(self.backoff.max_interval)
    }

    /// After a success: the next failure starts from the initial delay again.
    pub fn reset(&mut self) {
        self.backoff.reset();
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::new()
    }
}

/// Whether an error with this SQLSTATE may go away by itself: connection failures, server
/// shutdown or start-up, too many connections, serialization failures and deadlocks, and an
/// object in use (a replication slot still held by the walsender of a killed predecessor).
pub fn is_transient(code: &SqlState) -> bool {
    let code = code.code();
    // Besides connection trouble, conflicts and a server shutting down: a full disk (53100),
    // memory (53200) or a read-only server (25006, a standby or failover) that an operator
    // fixes; the log keeps everything meanwhile.
    code.starts_with("08")
        || code.starts_with("57P")
        || matches!(
            code,
            "53100" | "53200" | "53300" | "25006" | "40001" | "40P01" | "55006" | "55P03"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let mut policy = RetryPolicy::new();
        let first = policy.next_delay();
        assert!(first <= Duration::from_millis(400), "{first:?}");
        let later = (0..40).map(|_| policy.next_delay()).last().unwrap();
        assert!(later <= Duration::from_secs(45) && later >= Duration::from_secs(10));
        policy.reset();
        assert!(policy.next_delay() <= Duration::from_millis(400));
    }

    #[test]
    fn classifies_by_sqlstate() {
        assert!(is_transient(&SqlState::ADMIN_SHUTDOWN));
        assert!(is_transient(&SqlState::DISK_FULL));
        assert!(is_transient(&SqlState::READ_ONLY_SQL_TRANSACTION));
        assert!(is_transient(&SqlState::CONNECTION_FAILURE));
        assert!(is_transient(&SqlState::T_R_SERIALIZATION_FAILURE));
        assert!(is_transient(&SqlState::OBJECT_IN_USE));
        assert!(!is_transient(&SqlState::INVALID_PASSWORD));
        assert!(!is_transient(&SqlState::INSUFFICIENT_PRIVILEGE));
        assert!(!is_transient(&SqlState::UNDEFINED_OBJECT));
    }
}
