use std::time::Duration;

/// Timing knobs of the reconcile loop.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// How often a converged Machine's instance is polled for drift.
    pub poll_interval: Duration,
    /// How often an instance in transition (Starting, Stopping, ...) is polled.
    pub progress_interval: Duration,
    /// The first retry delay after a failure; doubled per consecutive failure.
    pub backoff_base: Duration,
    /// The longest retry delay.
    pub backoff_cap: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            poll_interval: Duration::from_secs(60),
            progress_interval: Duration::from_secs(2),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
        }
    }
}

/// The delay before retry number `failures` (1 = after the first failure): exponential,
/// capped, with up to 20% jitter either way, and never less than the provider's
/// `retry_after` (which may exceed the cap: the provider knows best).
pub fn backoff_delay(settings: &Settings, failures: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    let raw = settings.backoff_base.saturating_mul(1u32 << exponent).min(settings.backoff_cap);
    let factor = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
    let jittered = raw.mul_f64(factor).min(settings.backoff_cap);
    // Whole seconds: the delay ends up in status as a timestamp with second precision.
    let secs = jittered.as_secs_f64().ceil().max(1.0) as u64;
    let delay = Duration::from_secs(secs);
    match retry_after {
        Some(after) => delay.max(after),
        None => delay,
    }
}

/// Spreads periodic polls so Machines created together are not polled together.
pub fn jittered(interval: Duration, jitter: f64) -> Duration {
    interval.mul_f64(0.9 + 0.2 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_and_caps() {
        let s = Settings::default();
        let d: Vec<u64> = (1..=12).map(|n| backoff_delay(&s, n, None, 0.5).as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    }

    #[test]
    fn jitter_stays_within_20_percent_and_cap() {
        let s = Settings::default();
        assert_eq!(backoff_delay(&s, 5, None, 0.0).as_secs(), 13); // 16 * 0.8 = 12.8 -> 13
        assert_eq!(backoff_delay(&s, 5, None, 1.0).as_secs(), 20); // 16 * 1.2 = 19.2 -> 20
        assert_eq!(backoff_delay(&s, 30, None, 1.0).as_secs(), 300);
    }

    #[test]
    fn honours_retry_after() {
        let s = Settings::default();
        assert_eq!(backoff_delay(&s, 1, Some(Duration::from_secs(30)), 0.5).as_secs(), 30);
        assert_eq!(backoff_delay(&s, 8, Some(Duration::from_secs(30)), 0.5).as_secs(), 128);
        assert_eq!(backoff_delay(&s, 1, Some(Duration::from_secs(900)), 0.5).as_secs(), 900);
    }
}
