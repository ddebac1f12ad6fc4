//! A circuit breaker per sink: opens after consecutive failures, lets one probe through
//! after the cooldown (half-open), closes on the probe's success. While it is open, jobs
//! stay due and burn no attempts. Times are in milliseconds from the caller's clock.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed {
        failures: u32,
    },
    Open {
        until_ms: u64,
    },
    /// The cooldown is over; `probing` while the one probe is out.
    HalfOpen {
        probing: bool,
    },
}

#[derive(Debug, Clone)]
pub struct Breaker {
    pub state: State,
    threshold: u32,
    cooldown: Duration,
}

/// The breaker's answer to "may this request start?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    No,
    Yes,
    /// Yes, as the one probe of a half-open breaker.
    Probe,
}

/// What an attempt tells the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The sink answered meaningfully (delivered, or a permanent refusal).
    Healthy,
    /// 5xx, timeout, connection failure.
    Failing,
    /// Rate limited: says nothing about health.
    Neutral,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            state: State::Closed { failures: 0 },
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// May a request start now? In half-open state, only the one probe may.
    pub fn admit(&mut self, now_ms: u64) -> Admit {
        match self.state {
            State::Closed { .. } => Admit::Yes,
            State::Open { until_ms } if now_ms >= until_ms => {
                self.state = State::HalfOpen { probing: true };
                Admit::Probe
            }
            State::Open { .. } => Admit::No,
            State::HalfOpen { probing: false } => {
                self.state = State::HalfOpen { probing: true };
                Admit::Probe
            }
            State::HalfOpen { probing: true } => Admit::No,
        }
    }

    /// The probe admitted was not sent after all: let the next one through.
    pub fn release_probe(&mut self) {
        if self.state == (State::HalfOpen { probing: true }) {
            self.state = State::HalfOpen { probing: false };
        }
    }

    /// When an open breaker will let a probe through.
    pub fn blocked_until(&self) -> Option<u64> {
        match self.state {
            State::Open { until_ms } => Some(until_ms),
            _ => None,
        }
    }

    pub fn record(&mut self, signal: Signal, now_ms: u64) {
        let open = State::Open {
            until_ms: now_ms + self.cooldown.as_millis() as u64,
        };
        self.state = match (self.state, signal) {
            (_, Signal::Healthy) => State::Closed { failures: 0 },
            (State::Closed { failures }, Signal::Failing) if failures + 1 >= self.threshold => open,
            (State::Closed { failures }, Signal::Failing) => State::Closed {
                failures: failures + 1,
            },
            (State::HalfOpen { .. }, Signal::Failing) => open,
            (State::HalfOpen { .. }, Signal::Neutral) => State::HalfOpen { probing: false },
            (s, _) => s,
        };
    }

    pub fn label(&self) -> &'static str {
        match self.state {
            State::Closed { .. } => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half_open",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_probes_once_and_closes_on_success() {
        let mut b = Breaker::new(3, Duration::from_secs(10));
        for t in 0..2 {
            assert_eq!(b.admit(t), Admit::Yes);
            b.record(Signal::Failing, t);
        }
        // A success in between resets the count.
        b.record(Signal::Healthy, 2);
        for t in 3..6 {
            assert_eq!(b.admit(t), Admit::Yes);
            b.record(Signal::Failing, t);
        }
        assert_eq!(b.state, State::Open { until_ms: 10_005 });
        assert_eq!(b.admit(9_000), Admit::No, "open: nothing goes out");
        assert_eq!(b.blocked_until(), Some(10_005));
        assert_eq!(
            b.admit(10_005),
            Admit::Probe,
            "after the cooldown: one probe"
        );
        assert_eq!(b.admit(10_006), Admit::No, "only one probe at a time");
        b.record(Signal::Healthy, 10_100);
        assert_eq!(b.state, State::Closed { failures: 0 });
        assert_eq!(b.admit(10_101), Admit::Yes);
    }

    #[test]
    fn a_failed_probe_reopens_and_rate_limits_are_neutral() {
        let mut b = Breaker::new(1, Duration::from_secs(1));
        b.record(Signal::Failing, 0);
        assert_eq!(b.admit(1_000), Admit::Probe);
        b.record(Signal::Failing, 1_000);
        assert_eq!(b.state, State::Open { until_ms: 2_000 });
        assert_eq!(b.admit(2_000), Admit::Probe);
        b.record(Signal::Neutral, 2_001);
        assert_eq!(b.state, State::HalfOpen { probing: false });
        assert_eq!(
            b.admit(2_002),
            Admit::Probe,
            "a 429 probe frees the slot for another probe"
        );
        b.release_probe();
        assert_eq!(
            b.admit(2_003),
            Admit::Probe,
            "a probe that was never sent frees its slot"
        );
        let mut c = Breaker::new(2, Duration::from_secs(1));
        c.record(Signal::Neutral, 0);
        c.record(Signal::Neutral, 0);
        assert_eq!(c.state, State::Closed { failures: 0 });
    }
}
