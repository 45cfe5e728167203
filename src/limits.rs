//! Per-identity limits on detokenization: a token bucket for the rate the policy allows, and
//! a per-minute count of lookups of tokens that do not exist (enumeration). Both are kept in
//! memory only; a restart starts every identity afresh.
//!
//! With several nodes over one store, each node enforces its share of the policy's limits
//! ([`share`]): the rate, the burst and the unknown-token cap divided by the live nodes.
//! Behind a load balancer that spreads an identity's requests, the cluster then admits the
//! policy's rate, not a multiple of it; nothing is exchanged per request. A client that sends
//! everything to one node gets that node's share only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::policy::Limits;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Rate,
    UnknownTokens,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Rate => "detokenize rate above the policy's limit",
            Refusal::UnknownTokens => "too many lookups of unknown tokens (enumeration)",
        }
    }
}

struct State {
    tokens: f64,
    refilled: Instant,
    misses: u32,
    window: Instant,
}

#[derive(Default)]
pub struct Limiter {
    identities: Mutex<HashMap<String, State>>,
}

const MINUTE: Duration = Duration::from_secs(60);

impl Limiter {
    /// Takes one detokenization from `identity`'s allowance, or says why it cannot.
    pub fn admit(&self, identity: &str, limits: Limits, now: Instant) -> Result<(), Refusal> {
        let mut map = self.identities.lock().unwrap_or_else(|p| p.into_inner());
        let state = map.entry(identity.to_owned()).or_insert(State {
            tokens: f64::from(limits.detokenize_burst),
            refilled: now,
            misses: 0,
            window: now,
        });
        if now.duration_since(state.window) >= MINUTE {
            state.misses = 0;
            state.window = now;
        }
        if state.misses >= limits.unknown_tokens_per_minute {
            return Err(Refusal::UnknownTokens);
        }
        let Some(rate) = limits.detokenize_per_second else {
            return Ok(());
        };
        let elapsed = now.duration_since(state.refilled).as_secs_f64();
        state.tokens = (state.tokens + elapsed * rate).min(f64::from(limits.detokenize_burst));
        state.refilled = now;
        if state.tokens < 1.0 {
            return Err(Refusal::Rate);
        }
        state.tokens -= 1.0;
        Ok(())
    }

    /// Counts a lookup of a token that does not exist.
    pub fn missed(&self, identity: &str, now: Instant) {
        let mut map = self.identities.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = map.get_mut(identity) {
            if now.duration_since(state.window) >= MINUTE {
                state.misses = 0;
                state.window = now;
            }
            state.misses = state.misses.saturating_add(1);
        }
    }
}

/// One node's share of `limits` when `nodes` serve together: the rate divided by `nodes`,
/// the burst and the unknown-token cap too (rounded up, so each stays at least 1).
pub fn share(limits: Limits, nodes: usize) -> Limits {
    let n = u32::try_from(nodes.max(1)).unwrap_or(u32::MAX);
    if n == 1 {
        return limits;
    }
    Limits {
        detokenize_per_second: limits.detokenize_per_second.map(|r| r / f64::from(n)),
        detokenize_burst: limits.detokenize_burst.div_ceil(n).max(1),
        unknown_tokens_per_minute: limits.unknown_tokens_per_minute.div_ceil(n).max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let limiter = Limiter::default();
        let limits = Limits {
            detokenize_per_second: Some(2.0),
            detokenize_burst: 3,
            unknown_tokens_per_minute: 60,
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.admit("r", limits, t0), Ok(()));
        }
        assert_eq!(limiter.admit("r", limits, t0), Err(Refusal::Rate));
        // Half a second refills one.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(limiter.admit("r", limits, t1), Ok(()));
        assert_eq!(limiter.admit("r", limits, t1), Err(Refusal::Rate));
        // Another identity has its own bucket.
        assert_eq!(limiter.admit("other", limits, t1), Ok(()));
    }

    #[test]
    fn each_node_takes_its_share_of_the_limits() {
        let limits = Limits {
            detokenize_per_second: Some(30.0),
            detokenize_burst: 10,
            unknown_tokens_per_minute: 5,
        };
        let third = share(limits, 3);
        assert_eq!(third.detokenize_per_second, Some(10.0));
        assert_eq!(third.detokenize_burst, 4);
        assert_eq!(third.unknown_tokens_per_minute, 2);
        let one = share(limits, 1);
        assert_eq!(one.detokenize_per_second, Some(30.0));
        assert_eq!(one.detokenize_burst, 10);
    }

    #[test]
    fn unknown_token_lookups_are_capped_per_minute() {
        let limiter = Limiter::default();
        let limits = Limits {
            unknown_tokens_per_minute: 2,
            ..Limits::default()
        };
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(limiter.admit("r", limits, t0), Ok(()));
            limiter.missed("r", t0);
        }
        assert_eq!(limiter.admit("r", limits, t0), Err(Refusal::UnknownTokens));
        assert_eq!(limiter.admit("r", limits, t0 + MINUTE), Ok(()));
    }
}
