//! Logging setup: tracing to stderr. Under systemd (JOURNAL_STREAM set) each line carries an
//! sd-daemon `<N>` priority prefix so journald records the right level.
use tracing_subscriber::EnvFilter;

/// Initialise logging once; `-v` raises and `-q` lowers the default level.
pub fn init(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter =
        EnvFilter::try_from_env("DPS_STATION_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
