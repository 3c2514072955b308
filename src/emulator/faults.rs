//! Injected trouble for resilience tests: the `--faults` spec (error rate, latency,
//! connection resets, a down window, `bad-id=ID`: a bulk request naming that id is refused
//! as a whole with a DPS-shaped HTTP 400) and the `--ops-per-minute` token-bucket throttle.
//! Pure bookkeeping: it decides what should happen to a request; the server acts on it.
//! It must never affect the `/_emulator/` admin endpoints (the server does not ask it).
use std::time::{Duration, Instant};

/// A parsed `--faults` spec (comma-separated `key=value`).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    /// Fraction of requests answered with `status`.
    pub error_rate: f64,
    /// Status used by `error_rate` (default 503).
    pub status: u16,
    /// Delay added before every request is handled.
    pub latency: Duration,
    /// Fraction of requests whose connection is dropped without a response.
    pub reset_rate: f64,
    /// Length of the outage window, if any.
    pub down_for: Option<Duration>,
    /// When the outage starts, counted from when the spec was set.
    pub down_after: Duration,
    /// Lower-case ids (`bad-id=ID`, repeatable): a bulk request containing any of them is
    /// answered with one whole-request 400, as DPS does for a body it cannot take.
    pub bad_ids: Vec<String>,
}

impl Default for FaultSpec {
    fn default() -> Self {
        FaultSpec {
            error_rate: 0.0,
            status: 503,
            latency: Duration::ZERO,
            reset_rate: 0.0,
            down_for: None,
            down_after: Duration::ZERO,
            bad_ids: Vec::new(),
        }
    }
}

/// A `--faults` spec that could not be parsed; names the offending key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fault spec: {0}")]
pub struct FaultSpecError(pub String);

fn rate(key: &str, v: &str) -> Result<f64, FaultSpecError> {
    let r: f64 = v
        .parse()
        .map_err(|_| FaultSpecError(format!("{key}={v:?} is not a number")))?;
    if !(0.0..=1.0).contains(&r) {
        return Err(FaultSpecError(format!("{key}={v} must be between 0 and 1")));
    }
    Ok(r)
}

fn duration(key: &str, v: &str) -> Result<Duration, FaultSpecError> {
    humantime::parse_duration(v).map_err(|e| {
        FaultSpecError(format!(
            "{key}={v:?} is not a duration like 200ms or 10s ({e})"
        ))
    })
}

impl FaultSpec {
    /// Parse `error-rate=0.2,status=500,latency=200ms,reset-rate=0.1,down-for=120s,down-after=10s,bad-id=ID`.
    /// An empty spec means no faults; `bad-id` may be given more than once.
    pub fn parse(spec: &str) -> Result<FaultSpec, FaultSpecError> {
        let mut f = FaultSpec::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| FaultSpecError(format!("{part:?} is not key=value")))?;
            let (k, v) = (k.trim(), v.trim());
            match k {
                "error-rate" => f.error_rate = rate(k, v)?,
                "reset-rate" => f.reset_rate = rate(k, v)?,
                "status" => {
                    f.status = v
                        .parse()
                        .ok()
                        .filter(|s| (400..=599).contains(s))
                        .ok_or_else(|| FaultSpecError(format!("status={v:?} must be an HTTP error status 400-599")))?
                }
                "latency" => f.latency = duration(k, v)?,
                "down-for" => f.down_for = Some(duration(k, v)?),
                "down-after" => f.down_after = duration(k, v)?,
                "bad-id" => {
                    if v.is_empty() {
                        return Err(FaultSpecError("bad-id= needs a registration id".into()));
                    }
                    f.bad_ids.push(v.to_ascii_lowercase());
                }
                other => {
                    return Err(FaultSpecError(format!(
                        "unknown key {other:?} (known: error-rate, status, latency, reset-rate, down-for, down-after, bad-id)"
                    )))
                }
            }
        }
        Ok(f)
    }
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Answer with this injected error status.
    Error(u16),
    /// Drop the connection without a response.
    Reset,
}

/// The active spec and the instant it was set (the down window counts from it).
#[derive(Debug)]
pub struct Faults {
    spec: FaultSpec,
    since: Instant,
}

impl Faults {
    pub fn new(spec: FaultSpec) -> Self {
        Faults {
            spec,
            since: Instant::now(),
        }
    }

    pub fn latency(&self) -> Duration {
        self.spec.latency
    }

    /// True when `id` is named by a `bad-id` key (ids compare case-insensitively).
    pub fn is_bad_id(&self, id: &str) -> bool {
        self.spec.bad_ids.iter().any(|b| b.eq_ignore_ascii_case(id))
    }

    /// Decide for one request; `roll_reset`/`roll_error` are uniform samples in [0, 1).
    pub fn decide(&self, now: Instant, roll_reset: f64, roll_error: f64) -> Verdict {
        if let Some(down_for) = self.spec.down_for {
            let start = self.since + self.spec.down_after;
            if now >= start && now < start + down_for {
                return Verdict::Reset;
            }
        }
        if roll_reset < self.spec.reset_rate {
            return Verdict::Reset;
        }
        if roll_error < self.spec.error_rate {
            return Verdict::Error(self.spec.status);
        }
        Verdict::Pass
    }
}

/// `--ops-per-minute N` as a token bucket: it refills N/60 tokens per second up to a
/// capacity of max(1, ⌈N/10⌉), and every request takes one token (a bulk call is one
/// operation). So at most N operations per minute are admitted sustained, with bursts of
/// up to N/10. `N = 0` admits nothing. A refused request learns the whole seconds (≥ 1)
/// until the next token, which the server sends as `Retry-After`.
#[derive(Debug, Default)]
pub struct Throttle {
    limit: Option<u32>,
    /// Tokens in the bucket at `at`.
    tokens: f64,
    at: Option<Instant>,
}

/// What a refused request is told when the limit is 0 (no token ever comes).
const NEVER_SECS: u64 = 60;

impl Throttle {
    /// A throttle with a full bucket (`None` = unlimited).
    pub fn new(limit: Option<u32>) -> Self {
        Throttle {
            limit,
            tokens: limit.map_or(0.0, Self::capacity_of),
            at: None,
        }
    }

    /// max(1, ⌈n/10⌉): the largest burst admitted at once.
    fn capacity_of(n: u32) -> f64 {
        f64::from(n.div_ceil(10).max(1))
    }

    /// Change the limit; the bucket starts full at the new capacity.
    pub fn set_limit(&mut self, limit: Option<u32>) {
        *self = Throttle::new(limit);
    }

    /// Admit one operation at `now`, or say how many whole seconds (≥ 1) until a token.
    pub fn admit(&mut self, now: Instant) -> Result<(), u64> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        if limit == 0 {
            return Err(NEVER_SECS);
        }
        let rate = f64::from(limit) / 60.0; // tokens per second
        let capacity = Self::capacity_of(limit);
        if let Some(at) = self.at {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            self.tokens = (self.tokens + elapsed * rate).min(capacity);
        }
        self.at = Some(now);
        // (The epsilon absorbs float noise: 0.4 + 0.6 tokens is a whole token.)
        if self.tokens >= 1.0 - 1e-9 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            return Ok(());
        }
        let wait = (1.0 - self.tokens) / rate;
        // A hair of slack so float rounding never turns 2.0000001 s into 3.
        let secs = (wait - 1e-6).ceil().max(1.0);
        Err(secs as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key_and_names_bad_ones() {
        let f = FaultSpec::parse(
            "error-rate=0.2, status=500,latency=200ms,reset-rate=0.1,down-for=120s,down-after=10s",
        )
        .unwrap();
        assert_eq!(f.error_rate, 0.2);
        assert_eq!(f.status, 500);
        assert_eq!(f.latency, Duration::from_millis(200));
        assert_eq!(f.down_for, Some(Duration::from_secs(120)));
        assert_eq!(f.down_after, Duration::from_secs(10));
        assert_eq!(FaultSpec::parse("").unwrap(), FaultSpec::default());
        assert!(FaultSpec::parse("error-rate=2")
            .unwrap_err()
            .0
            .contains("error-rate"));
        assert!(FaultSpec::parse("bogus=1").unwrap_err().0.contains("bogus"));
        assert!(FaultSpec::parse("status=200").is_err());
        let f = FaultSpec::parse("bad-id=Board-X, bad-id=y").unwrap();
        assert_eq!(f.bad_ids, ["board-x", "y"]);
        let faults = Faults::new(f);
        assert!(faults.is_bad_id("BOARD-x") && faults.is_bad_id("y"));
        assert!(!faults.is_bad_id("board"));
        assert!(FaultSpec::parse("bad-id=")
            .unwrap_err()
            .0
            .contains("bad-id"));
    }

    #[test]
    fn down_window_resets_only_inside_it() {
        let f = Faults::new(FaultSpec::parse("down-for=10s,down-after=5s").unwrap());
        let t0 = f.since;
        assert_eq!(
            f.decide(t0 + Duration::from_secs(1), 0.9, 0.9),
            Verdict::Pass
        );
        assert_eq!(
            f.decide(t0 + Duration::from_secs(6), 0.9, 0.9),
            Verdict::Reset
        );
        assert_eq!(
            f.decide(t0 + Duration::from_secs(16), 0.9, 0.9),
            Verdict::Pass
        );
        let f = Faults::new(FaultSpec::parse("error-rate=0.5,status=500").unwrap());
        assert_eq!(f.decide(Instant::now(), 0.9, 0.4), Verdict::Error(500));
        assert_eq!(f.decide(Instant::now(), 0.9, 0.6), Verdict::Pass);
    }

    #[test]
    fn throttle_is_a_token_bucket_with_bursts_of_a_tenth() {
        // 60/min: one token a second, bursts of 6.
        let mut t = Throttle::new(Some(60));
        let t0 = Instant::now();
        for i in 0..6 {
            assert!(t.admit(t0).is_ok(), "burst request {i}");
        }
        assert_eq!(t.admit(t0), Err(1));
        assert_eq!(t.admit(t0 + Duration::from_millis(400)), Err(1));
        assert!(t.admit(t0 + Duration::from_millis(1000)).is_ok());
        assert_eq!(t.admit(t0 + Duration::from_millis(1000)), Err(1));
        // Sustained: over a further minute at most 60 more are admitted.
        let mut admitted = 0;
        for ms in (1010..61_000).step_by(10) {
            if t.admit(t0 + Duration::from_millis(ms)).is_ok() {
                admitted += 1;
            }
        }
        assert!((59..=60).contains(&admitted), "{admitted}");

        // 3/min: capacity 1, a token every 20 s; Retry-After counts down in whole seconds.
        let mut t = Throttle::new(Some(3));
        assert!(t.admit(t0).is_ok());
        assert_eq!(t.admit(t0), Err(20));
        assert_eq!(t.admit(t0 + Duration::from_millis(500)), Err(20));
        assert_eq!(t.admit(t0 + Duration::from_secs(15)), Err(5));
        assert!(t.admit(t0 + Duration::from_secs(20)).is_ok());

        // 1000/min: bursts of 100.
        let mut t = Throttle::new(Some(1000));
        assert_eq!((0..150).filter(|_| t.admit(t0).is_ok()).count(), 100);

        // 0 admits nothing; a new limit starts with a full bucket; None is unlimited.
        t.set_limit(Some(0));
        assert_eq!(t.admit(t0), Err(60));
        t.set_limit(Some(20));
        assert!(t.admit(t0).is_ok() && t.admit(t0).is_ok());
        assert_eq!(t.admit(t0), Err(3));
        t.set_limit(None);
        assert!((0..1000).all(|_| t.admit(t0).is_ok()));
    }
}
