//! When to try again: exponential backoff with full jitter (the `backoff` crate computes the
//! exponential interval; the wait is uniform in [0, interval]), or the vendor's own wait
//! (`Retry-After`, reset headers) clamped to the sink's cap. The only user of `backoff`.

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use std::time::Duration;

/// A sink's retry timing.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub initial: Duration,
    pub max_delay: Duration,
    pub max_retry_after: Duration,
}

impl Schedule {
    /// The exponential interval before attempt `attempt + 1` (attempt counts from 1).
    pub fn interval(&self, attempt: u32) -> Duration {
        let mut b = ExponentialBackoff {
            current_interval: self.initial,
            initial_interval: self.initial,
            randomization_factor: 0.0,
            multiplier: 2.0,
            max_interval: self.max_delay,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        let mut d = self.initial;
        for _ in 0..attempt.clamp(1, 64) {
            d = b.next_backoff().unwrap_or(self.max_delay);
        }
        d.min(self.max_delay)
    }

    /// The wait after failed attempt `attempt`: the vendor's `after` (clamped) when given,
    /// else full jitter over the exponential interval. `unit` is a uniform sample in [0, 1).
    pub fn delay(&self, attempt: u32, after: Option<Duration>, unit: f64) -> Duration {
        match after {
            Some(a) => a.min(self.max_retry_after),
            None => self.interval(attempt).mul_f64(unit.clamp(0.0, 1.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s() -> Schedule {
        Schedule {
            initial: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(300),
        }
    }

    #[test]
    fn the_interval_doubles_up_to_the_cap() {
        let got: Vec<u64> = (1..=8).map(|a| s().interval(a).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(s().interval(1000), Duration::from_secs(60));
    }

    #[test]
    fn full_jitter_spans_zero_to_the_interval() {
        assert_eq!(s().delay(4, None, 0.0), Duration::ZERO);
        assert_eq!(s().delay(4, None, 0.5), Duration::from_secs(4));
        assert!(s().delay(4, None, 0.999) < Duration::from_secs(8));
    }

    #[test]
    fn retry_after_is_honoured_and_clamped() {
        assert_eq!(
            s().delay(1, Some(Duration::from_secs(30)), 0.9),
            Duration::from_secs(30)
        );
        assert_eq!(
            s().delay(1, Some(Duration::from_secs(86_400)), 0.9),
            Duration::from_secs(300)
        );
    }
}
