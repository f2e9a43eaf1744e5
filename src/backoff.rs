//! The one retry backoff: exponential from a base, capped, each delay jittered between half of
//! it and all of it (so retries of several sessions spread out). Pure; owns no clock.

use std::time::Duration;

/// A jittered exponential backoff: attempt n waits a random time in [d/2, d] for
/// d = base·2^(n-1), at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay before retry `attempt` (1 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        half + Duration::from_millis(fastrand::u64(0..=(ceiling - half).as_millis() as u64))
    }

    /// The longest delay of `attempt`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: Backoff = Backoff {
        base: Duration::from_millis(200),
        max: Duration::from_secs(5),
    };

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        // The README's numbers, written out: 200 ms doubling per attempt, at most 5 s, each
        // delay jittered between half of that and all of it.
        let ceilings_ms: [u64; 8] = [200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        for (i, &ms) in ceilings_ms.iter().enumerate() {
            let attempt = i as u32 + 1;
            assert_eq!(CHUNK.ceiling(attempt), Duration::from_millis(ms));
            let seen: std::collections::BTreeSet<Duration> =
                (0..200).map(|_| CHUNK.delay(attempt)).collect();
            for d in &seen {
                assert!(
                    *d >= Duration::from_millis(ms / 2) && *d <= Duration::from_millis(ms),
                    "attempt {attempt}: {d:?} outside {}..={ms} ms",
                    ms / 2
                );
            }
            assert!(seen.len() > 10, "attempt {attempt}: no jitter: {seen:?}");
        }
        for attempt in [0, 20, 31, 32, 1000, u32::MAX] {
            let d = CHUNK.delay(attempt);
            let ceiling = CHUNK.ceiling(attempt);
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
        }
        assert_eq!(CHUNK.ceiling(40), Duration::from_secs(5));
        let slow = Backoff {
            base: Duration::from_millis(200),
            max: Duration::from_secs(10),
        };
        assert_eq!(slow.ceiling(30), Duration::from_secs(10));
    }
}
