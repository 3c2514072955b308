//! Logging setup: tracing to stderr, levels from `-v`/`-q` or `DPS_STATION_LOG`.
//!
//! Under systemd (`JOURNAL_STREAM` set, i.e. stderr is connected to journald) every line
//! starts with an sd-daemon `<N>` priority prefix (sd-daemon(3)), so journald files each
//! line at the right level without a journald client library. Log lines must never carry
//! keys, SAS tokens or private keys; callers log ids and error codes only.
use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// sd-daemon priority for a tracing level (syslog levels: 3 err, 4 warning, 6 info, 7 debug).
pub fn journald_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// A compact formatter for journald: `<N>target: message key=value…` (journald adds time).
struct JournalFormat;

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        write!(
            writer,
            "<{}>{}: ",
            journald_priority(meta.level()),
            meta.target()
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// The default filter for the given verbosity flags.
pub fn default_level(verbose: u8, quiet: bool) -> &'static str {
    match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    }
}

/// Initialise logging once; `-v` raises and `-q` lowers the default level. `main` passes
/// `verbose >= 1` for `run`, so the daemon logs at info by default.
pub fn init(verbose: u8, quiet: bool) {
    let level = default_level(verbose, quiet);
    // tss-esapi logs its own failures through `log`; our typed TPM errors already carry
    // them, so it only speaks at trace level.
    let default = if verbose >= 3 {
        level.to_string()
    } else {
        format!("{level},tss_esapi=off")
    };
    let filter =
        EnvFilter::try_from_env("DPS_STATION_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(JournalFormat)
            .try_init();
    } else {
        // Colour only for a person at a terminal; files and pipes get plain text.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(journald_priority(&Level::ERROR), 3);
        assert_eq!(journald_priority(&Level::WARN), 4);
        assert_eq!(journald_priority(&Level::INFO), 6);
        assert_eq!(journald_priority(&Level::DEBUG), 7);
        assert_eq!(default_level(0, true), "error");
        assert_eq!(default_level(1, false), "info");
    }
}
