//! How a failed request is tried again: one backoff policy type, with the policies the
//! store client, multipart uploads and the write-back queue use.

use std::time::{Duration, SystemTime};

/// Waits that double from `first` up to `max`, each with jitter (a random point in its
/// second half), so that many callers failing together do not retry in step; `attempts`
/// bounds the tries, when anything does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    /// Tries in all, the first included; None: until it succeeds (or something else, a
    /// deadline or a newer change, ends it).
    pub attempts: Option<u32>,
}

impl Backoff {
    /// A request to the store, retried by the SDK until its answer starts.
    pub const REQUEST: Backoff = Backoff {
        first: Duration::from_millis(100),
        max: Duration::from_secs(5),
        attempts: None,
    };
    /// The rest of a GET body that broke off, within the read deadline (the tries are the
    /// store client's `--max-attempts`).
    pub const BODY: Backoff = Backoff {
        first: Duration::from_millis(100),
        max: Duration::from_secs(2),
        attempts: None,
    };
    /// One part of a multipart upload the store refused for its body, before the whole
    /// upload fails (and the write-back queue tries it again).
    pub const PART: Backoff = Backoff {
        first: Duration::from_millis(200),
        max: Duration::from_millis(800),
        attempts: Some(4),
    };
    /// A change of the write-back queue (an upload, a delete batch, a marker): tried until
    /// it is in the bucket.
    pub const CHANGE: Backoff = Backoff {
        first: Duration::from_millis(200),
        max: Duration::from_secs(30),
        attempts: None,
    };

    /// The wait after failed try number `attempt` (1 for the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let step = self.first * 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
        let step = step.min(self.max);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        step / 2 + step.mul_f64((nanos % 1000) as f64 / 2000.0)
    }

    /// Whether try number `attempt` failing leaves another.
    pub fn tries_again(&self, attempt: u32) -> bool {
        self.attempts.is_none_or(|n| attempt < n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_with_jitter_in_their_second_half() {
        let b = Backoff::CHANGE;
        for (attempt, step) in [(1, 200), (2, 400), (3, 800), (9, 30_000), (40, 30_000)] {
            let step = Duration::from_millis(step);
            for _ in 0..20 {
                let d = b.delay(attempt);
                assert!(d >= step / 2 && d <= step, "try {attempt}: {d:?}");
            }
        }
        assert!(Backoff::PART.tries_again(3));
        assert!(!Backoff::PART.tries_again(4));
        assert!(Backoff::CHANGE.tries_again(u32::MAX));
    }
}
