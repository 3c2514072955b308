//! Injected trouble for resilience tests: the `--faults` spec (error rate, latency,
//! connection resets, a down window) and the `--ops-per-minute` sliding-window throttle.
//! Pure bookkeeping: it decides what should happen to a request; the server acts on it.
//! It must never affect the `/_emulator/` admin endpoints (the server does not ask it).
use std::collections::VecDeque;
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
    /// Parse `error-rate=0.2,status=500,latency=200ms,reset-rate=0.1,down-for=120s,down-after=10s`.
    /// An empty spec means no faults.
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
                other => {
                    return Err(FaultSpecError(format!(
                        "unknown key {other:?} (known: error-rate, status, latency, reset-rate, down-for, down-after)"
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

/// At most `limit` operations in any sliding 60 s window.
#[derive(Debug, Default)]
pub struct Throttle {
    limit: Option<u32>,
    recent: VecDeque<Instant>,
}

const WINDOW: Duration = Duration::from_secs(60);

impl Throttle {
    pub fn new(limit: Option<u32>) -> Self {
        Throttle {
            limit,
            recent: VecDeque::new(),
        }
    }

    pub fn set_limit(&mut self, limit: Option<u32>) {
        self.limit = limit;
    }

    /// Admit one operation at `now`, or say how many whole seconds (≥ 1) until a slot frees.
    pub fn admit(&mut self, now: Instant) -> Result<(), u64> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        while let Some(&t) = self.recent.front() {
            if now.duration_since(t) >= WINDOW {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if (self.recent.len() as u64) < u64::from(limit) {
            self.recent.push_back(now);
            return Ok(());
        }
        // The slot frees when the oldest op that keeps us at the limit leaves the window.
        let idx = self.recent.len().saturating_sub(limit as usize);
        let wait = match self.recent.get(idx) {
            Some(&t) => WINDOW.saturating_sub(now.duration_since(t)),
            None => WINDOW,
        };
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Err(secs.max(1))
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
    fn throttle_counts_a_sliding_minute() {
        let mut t = Throttle::new(Some(2));
        let t0 = Instant::now();
        assert!(t.admit(t0).is_ok());
        assert!(t.admit(t0 + Duration::from_secs(10)).is_ok());
        assert_eq!(t.admit(t0 + Duration::from_secs(20)), Err(40));
        assert!(t.admit(t0 + Duration::from_secs(60)).is_ok());
        assert_eq!(t.admit(t0 + Duration::from_millis(60_500)), Err(10));
        t.set_limit(None);
        assert!(t.admit(t0 + Duration::from_secs(61)).is_ok());
    }
}
