//! Scanner line framing and parsing (DESIGN.md §5).
//!
//! [`Framer`] turns a byte stream from a serial port into lines: `\r`, `\n` and `\r\n` each
//! end one line (a `\r\n` split across two reads is still one terminator), at most
//! [`MAX_LINE`] bytes not counting the terminator, empty lines ignored. An over-long line is
//! discarded up to its terminator and reported once as `too-long`; a line with a byte that is
//! not printable ASCII is reported as `binary`. [`parse`] matches a line against the
//! configured `line_pattern` (`bad-format` when it does not match).
//!
//! Nothing here may panic or allocate without bound, whatever bytes arrive.
use regex::Regex;

/// Longest accepted line, not counting its terminator.
pub const MAX_LINE: usize = 256;

/// A scan that parsed: the optional slot prefix and the board serial.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Scan {
    pub slot: Option<String>,
    pub serial: String,
}

/// A line that was refused. `reason` is one lower-case token of the §5 protocol.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct LineError {
    /// The serial when the line parsed far enough to know it.
    pub serial: Option<String>,
    pub reason: &'static str,
    /// One line of printable ASCII.
    pub detail: String,
}

impl LineError {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        LineError {
            serial: None,
            reason,
            detail: detail.into(),
        }
    }

    /// The §5 reply: `ERROR <serial-or-dash> <reason> <detail>` (no terminator).
    pub fn reply_line(&self) -> String {
        format!(
            "ERROR {} {} {}",
            self.serial.as_deref().unwrap_or("-"),
            self.reason,
            sanitize(&self.detail)
        )
    }
}

/// Make `s` safe for one reply line: printable ASCII only, no line breaks.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect()
}

/// Splits a byte stream into lines. Keep one per port; feed it every read.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// The current line went past [`MAX_LINE`]; drop bytes until its terminator.
    discarding: bool,
    /// The previous byte was `\r`: a `\n` right after it is part of the same terminator.
    after_cr: bool,
}

impl Framer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed bytes; returns the complete lines (or refusals) they finish, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Result<String, LineError>> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' && self.after_cr {
                self.after_cr = false;
                continue;
            }
            self.after_cr = b == b'\r';
            if b == b'\r' || b == b'\n' {
                if let Some(r) = self.finish() {
                    out.push(r);
                }
                continue;
            }
            if self.discarding {
                continue;
            }
            if self.buf.len() >= MAX_LINE {
                self.discarding = true;
                self.buf.clear();
                continue;
            }
            self.buf.push(b);
        }
        out
    }

    /// Bytes of an unfinished line held so far.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Forget a partial line (e.g. after the port was reopened).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.discarding = false;
        self.after_cr = false;
    }

    fn finish(&mut self) -> Option<Result<String, LineError>> {
        if self.discarding {
            self.discarding = false;
            self.buf.clear();
            return Some(Err(LineError::new(
                "too-long",
                format!("line longer than {MAX_LINE} bytes discarded"),
            )));
        }
        let line = std::mem::take(&mut self.buf);
        let trimmed = trim_blanks(&line);
        if trimmed.is_empty() {
            return None;
        }
        if let Some(pos) = trimmed.iter().position(|b| !(0x20..=0x7e).contains(b)) {
            return Some(Err(LineError::new(
                "binary",
                format!(
                    "non-printable byte 0x{:02x} at offset {pos}",
                    trimmed.get(pos).copied().unwrap_or(0)
                ),
            )));
        }
        // All bytes are printable ASCII, so this is valid UTF-8.
        Some(Ok(String::from_utf8_lossy(trimmed).into_owned()))
    }
}

/// Strip spaces and tabs at both ends (scanners often pad).
fn trim_blanks(b: &[u8]) -> &[u8] {
    let blank = |c: &u8| *c == b' ' || *c == b'\t';
    let start = b.iter().position(|c| !blank(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !blank(c)).map_or(start, |e| e + 1);
    b.get(start..end).unwrap_or(&[])
}

/// Match a framed line against `pattern` (which has a `serial` group and maybe a `slot` one).
pub fn parse(line: &str, pattern: &Regex) -> Result<Scan, LineError> {
    if line.len() > MAX_LINE {
        return Err(LineError::new(
            "too-long",
            format!("line longer than {MAX_LINE} bytes"),
        ));
    }
    if let Some(pos) = line.bytes().position(|b| !(0x20..=0x7e).contains(&b)) {
        return Err(LineError::new(
            "binary",
            format!("non-printable character at offset {pos}"),
        ));
    }
    let Some(caps) = pattern.captures(line) else {
        return Err(LineError::new(
            "bad-format",
            "line does not match line_pattern",
        ));
    };
    let serial = caps.name("serial").map(|m| m.as_str()).unwrap_or("");
    if serial.is_empty() {
        return Err(LineError::new(
            "bad-format",
            "line_pattern matched but the serial group is empty",
        ));
    }
    let slot = caps
        .name("slot")
        .map(|m| m.as_str().to_string())
        .filter(|s| !s.is_empty());
    Ok(Scan {
        slot,
        serial: serial.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_LINE_PATTERN;

    fn re() -> Regex {
        Regex::new(DEFAULT_LINE_PATTERN).unwrap()
    }

    fn lines(chunks: &[&[u8]]) -> Vec<Result<String, LineError>> {
        let mut f = Framer::new();
        chunks.iter().flat_map(|c| f.push(c)).collect()
    }

    fn ok(s: &str) -> Result<String, LineError> {
        Ok(s.to_string())
    }

    #[test]
    fn each_terminator_ends_one_line() {
        assert_eq!(lines(&[b"AB12\n"]), vec![ok("AB12")]);
        assert_eq!(lines(&[b"AB12\r"]), vec![ok("AB12")]);
        assert_eq!(lines(&[b"AB12\r\nCD34\r\n"]), vec![ok("AB12"), ok("CD34")]);
        assert_eq!(
            lines(&[b"A1\rB2\nC3\r\nD4\r"]),
            vec![ok("A1"), ok("B2"), ok("C3"), ok("D4")]
        );
    }

    #[test]
    fn crlf_split_across_reads_is_one_terminator() {
        assert_eq!(
            lines(&[b"AB12\r", b"\nCD34\r", b"\n"]),
            vec![ok("AB12"), ok("CD34")]
        );
        // Byte by byte.
        let all = b"X1X1\r\nY2Y2\r\n";
        let chunks: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(lines(&chunks), vec![ok("X1X1"), ok("Y2Y2")]);
    }

    #[test]
    fn lf_cr_is_two_terminators_and_empty_lines_are_ignored() {
        assert_eq!(
            lines(&[b"AB12\n\rCD34\n\n\n\r\r"]),
            vec![ok("AB12"), ok("CD34")]
        );
        assert_eq!(lines(&[b"\r\n\r\n   \r\n"]), vec![]);
    }

    #[test]
    fn a_line_split_across_reads_is_joined() {
        assert_eq!(lines(&[b"AB", b"12", b"-3", b"\n"]), vec![ok("AB12-3")]);
    }

    #[test]
    fn exactly_256_bytes_is_accepted_257_is_too_long() {
        let at = "A".repeat(MAX_LINE);
        assert_eq!(lines(&[format!("{at}\n").as_bytes()]), vec![ok(&at)]);
        let over = "A".repeat(MAX_LINE + 1);
        let r = lines(&[format!("{over}\nOK12\n").as_bytes()]);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].as_ref().unwrap_err().reason, "too-long");
        assert_eq!(r[1], ok("OK12"));
    }

    #[test]
    fn over_long_line_yields_one_error_however_long_and_however_split() {
        let mut f = Framer::new();
        let mut out = Vec::new();
        for _ in 0..1000 {
            out.extend(f.push(&[b'Z'; 97]));
        }
        assert!(out.is_empty(), "nothing until the terminator");
        assert!(f.pending() <= MAX_LINE);
        out.extend(f.push(b"\r"));
        out.extend(f.push(b"\nGOOD1\r\n"));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].as_ref().unwrap_err().reason, "too-long");
        assert_eq!(out[1], ok("GOOD1"));
    }

    #[test]
    fn binary_bytes_are_refused_and_the_next_line_still_works() {
        let r = lines(&[b"AB\x00CD\nGOOD1\n"]);
        let e = r[0].as_ref().unwrap_err();
        assert_eq!(e.reason, "binary");
        assert!(e.detail.contains("0x00"), "{}", e.detail);
        assert_eq!(r[1], ok("GOOD1"));
        let r = lines(&[&[0xff, 0xfe, 0x80, b'\n']]);
        assert_eq!(r[0].as_ref().unwrap_err().reason, "binary");
        let r = lines(&[b"caf\xc3\xa9\n"]);
        assert_eq!(r[0].as_ref().unwrap_err().reason, "binary");
    }

    #[test]
    fn surrounding_blanks_are_trimmed() {
        assert_eq!(lines(&[b"  AB12\t \n"]), vec![ok("AB12")]);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut f = Framer::new();
        let mut x: u32 = 12345;
        for _ in 0..20_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let n = (x >> 24) as usize % 64;
            let chunk: Vec<u8> = (0..n).map(|i| (x >> (i % 24)) as u8).collect();
            for l in f.push(&chunk).into_iter().flatten() {
                assert!(l.len() <= MAX_LINE);
                let _ = parse(&l, &re());
            }
            assert!(f.pending() <= MAX_LINE);
        }
    }

    #[test]
    fn parse_takes_serial_and_optional_slot() {
        assert_eq!(
            parse("SN-0001", &re()),
            Ok(Scan {
                slot: None,
                serial: "SN-0001".into()
            })
        );
        assert_eq!(
            parse("fixture-2:SN-0001", &re()),
            Ok(Scan {
                slot: Some("fixture-2".into()),
                serial: "SN-0001".into()
            })
        );
    }

    #[test]
    fn parse_refuses_non_matching_lines() {
        for bad in [
            "sn-0001",
            "AB",
            "SN 0001",
            "fixture-1:",
            "A".repeat(33).as_str(),
        ] {
            let e = parse(bad, &re()).unwrap_err();
            assert_eq!(e.reason, "bad-format", "{bad}");
            assert_eq!(e.serial, None);
            assert!(
                e.reply_line().starts_with("ERROR - bad-format "),
                "{}",
                e.reply_line()
            );
        }
    }

    #[test]
    fn reply_line_is_one_printable_line() {
        let e = LineError {
            serial: Some("SN1".into()),
            reason: "tpm-error",
            detail: "bad\r\nthing\x00".into(),
        };
        assert_eq!(e.reply_line(), "ERROR SN1 tpm-error bad??thing?");
    }
}
