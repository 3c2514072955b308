//! X.509 checks with x509-parser: station CA validation, leaf CN checks, certificate info.
