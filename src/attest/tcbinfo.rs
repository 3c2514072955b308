//! The TCG `DiceTcbInfo` certificate extension (OID 2.23.133.5.4.1): a small DER encoder
//! and decoder for the fields the station writes into Alias certificates.
//!
//! ASN.1 (TCG DICE Attestation Architecture, as quoted in reference/dice-x509.md §2.2):
//! ```text
//! DiceTcbInfo ::= SEQUENCE {
//!     vendor [0] IMPLICIT UTF8String OPTIONAL,  model [1] IMPLICIT UTF8String OPTIONAL,
//!     version [2] IMPLICIT UTF8String OPTIONAL, svn [3] IMPLICIT INTEGER OPTIONAL,
//!     layer [4] IMPLICIT INTEGER OPTIONAL,      index [5] IMPLICIT INTEGER OPTIONAL,
//!     fwids [6] IMPLICIT FWIDLIST OPTIONAL,     flags [7] IMPLICIT OperationalFlags OPTIONAL,
//!     vendorInfo [8] IMPLICIT OCTET STRING OPTIONAL, type [9] IMPLICIT OCTET STRING OPTIONAL }
//! FWIDLIST ::= SEQUENCE SIZE (1..MAX) OF FWID
//! FWID ::= SEQUENCE { hashAlg OBJECT IDENTIFIER, digest OCTET STRING }
//! ```
//! The encoder is checked byte for byte against the Project-Cerberus vector
//! (`x509_extension_builder_dice_tcbinfo_test.c`). `flags` is not written; the decoder skips
//! fields it does not model. This module must never panic on malformed input: the decoder
//! returns [`TcbInfoError`] for anything it cannot read.

/// OID of `tcg-dice-TcbInfo`.
pub const TCG_DICE_TCB_INFO_OID: &[u64] = &[2, 23, 133, 5, 4, 1];
/// OID of SHA-256 (`id-sha256`), the FWID hash algorithm the station uses.
pub const SHA256_OID: &[u64] = &[2, 16, 840, 1, 101, 3, 4, 2, 1];

/// One firmware measurement: hash algorithm OID and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcbFwid {
    pub hash_alg: Vec<u64>,
    pub digest: Vec<u8>,
}

impl TcbFwid {
    /// A SHA-256 measurement.
    pub fn sha256(digest: [u8; 32]) -> Self {
        TcbFwid {
            hash_alg: SHA256_OID.to_vec(),
            digest: digest.to_vec(),
        }
    }
}

/// The fields of a `DiceTcbInfo` the station reads and writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcbInfo {
    pub vendor: Option<String>,
    pub model: Option<String>,
    pub version: Option<String>,
    pub svn: Option<u64>,
    pub layer: Option<u64>,
    pub index: Option<u64>,
    pub fwids: Vec<TcbFwid>,
    pub vendor_info: Option<Vec<u8>>,
    pub tcb_type: Option<Vec<u8>>,
}

/// Why a `DiceTcbInfo` value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TcbInfoError {
    #[error("DiceTcbInfo: truncated DER at byte {0}")]
    Truncated(usize),
    #[error("DiceTcbInfo: expected {expected} at byte {at}, found tag 0x{found:02x}")]
    UnexpectedTag {
        expected: &'static str,
        at: usize,
        found: u8,
    },
    #[error("DiceTcbInfo: {0}")]
    Invalid(&'static str),
}

// ---------------------------------------------------------------------------------------
// DER writing

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn push_tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    push_len(out, content.len());
    out.extend_from_slice(content);
}

/// Minimal two's-complement content octets of a non-negative integer.
fn uint_content(v: u64) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count().min(7);
    let mut c = Vec::with_capacity(9);
    if bytes[skip] & 0x80 != 0 {
        c.push(0);
    }
    c.extend_from_slice(&bytes[skip..]);
    c
}

fn oid_content(arcs: &[u64]) -> Vec<u8> {
    let mut c = Vec::new();
    let (first, rest) = match arcs {
        [a, b, rest @ ..] => (a * 40 + b, rest),
        [a] => (a * 40, &[][..]),
        [] => return c,
    };
    for arc in std::iter::once(first).chain(rest.iter().copied()) {
        let mut groups = Vec::new();
        let mut v = arc;
        groups.push((v & 0x7f) as u8);
        v >>= 7;
        while v > 0 {
            groups.push(0x80 | (v & 0x7f) as u8);
            v >>= 7;
        }
        groups.reverse();
        c.extend_from_slice(&groups);
    }
    c
}

impl TcbInfo {
    /// The DER encoding of this `DiceTcbInfo` (the extension's extnValue content).
    pub fn to_der(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(96);
        if let Some(v) = &self.vendor {
            push_tlv(&mut body, 0x80, v.as_bytes());
        }
        if let Some(v) = &self.model {
            push_tlv(&mut body, 0x81, v.as_bytes());
        }
        if let Some(v) = &self.version {
            push_tlv(&mut body, 0x82, v.as_bytes());
        }
        if let Some(v) = self.svn {
            push_tlv(&mut body, 0x83, &uint_content(v));
        }
        if let Some(v) = self.layer {
            push_tlv(&mut body, 0x84, &uint_content(v));
        }
        if let Some(v) = self.index {
            push_tlv(&mut body, 0x85, &uint_content(v));
        }
        if !self.fwids.is_empty() {
            let mut list = Vec::new();
            for f in &self.fwids {
                let mut fwid = Vec::new();
                push_tlv(&mut fwid, 0x06, &oid_content(&f.hash_alg));
                push_tlv(&mut fwid, 0x04, &f.digest);
                push_tlv(&mut list, 0x30, &fwid);
            }
            // [6] IMPLICIT on a SEQUENCE OF keeps the constructed bit: tag 0xA6.
            push_tlv(&mut body, 0xa6, &list);
        }
        if let Some(v) = &self.vendor_info {
            push_tlv(&mut body, 0x88, v);
        }
        if let Some(v) = &self.tcb_type {
            push_tlv(&mut body, 0x89, v);
        }
        let mut out = Vec::with_capacity(body.len() + 4);
        push_tlv(&mut out, 0x30, &body);
        out
    }

    /// Decode a `DiceTcbInfo` from DER. Fields not modelled here (flags, v1.2 additions)
    /// are skipped; trailing bytes after the SEQUENCE are an error.
    pub fn from_der(der: &[u8]) -> Result<Self, TcbInfoError> {
        let mut r = Reader { buf: der, pos: 0 };
        let (tag, body) = r.tlv()?;
        if tag != 0x30 {
            return Err(TcbInfoError::UnexpectedTag {
                expected: "SEQUENCE",
                at: 0,
                found: tag,
            });
        }
        if r.pos != der.len() {
            return Err(TcbInfoError::Invalid("trailing bytes after the SEQUENCE"));
        }
        let mut info = TcbInfo::default();
        let mut r = Reader { buf: body, pos: 0 };
        while !r.done() {
            let (tag, content) = r.tlv()?;
            match tag {
                0x80 => info.vendor = Some(utf8(content)?),
                0x81 => info.model = Some(utf8(content)?),
                0x82 => info.version = Some(utf8(content)?),
                0x83 => info.svn = Some(uint(content)?),
                0x84 => info.layer = Some(uint(content)?),
                0x85 => info.index = Some(uint(content)?),
                0xa6 => info.fwids = fwid_list(content)?,
                0x88 => info.vendor_info = Some(content.to_vec()),
                0x89 => info.tcb_type = Some(content.to_vec()),
                _ => {} // flags and later additions: not modelled
            }
        }
        Ok(info)
    }

    /// The first SHA-256 FWID, if any.
    pub fn sha256_fwid(&self) -> Option<[u8; 32]> {
        self.fwids
            .iter()
            .find(|f| f.hash_alg == SHA256_OID)
            .and_then(|f| <[u8; 32]>::try_from(f.digest.as_slice()).ok())
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
    fn byte(&mut self) -> Result<u8, TcbInfoError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(TcbInfoError::Truncated(self.pos))?;
        self.pos += 1;
        Ok(b)
    }
    fn tlv(&mut self) -> Result<(u8, &'a [u8]), TcbInfoError> {
        let tag = self.byte()?;
        if tag & 0x1f == 0x1f {
            return Err(TcbInfoError::Invalid("multi-byte tags are not supported"));
        }
        let first = self.byte()?;
        let len = if first < 0x80 {
            first as usize
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 {
                return Err(TcbInfoError::Invalid("unsupported length encoding"));
            }
            let mut len = 0usize;
            for _ in 0..n {
                len = (len << 8) | self.byte()? as usize;
            }
            len
        };
        let end = self
            .pos
            .checked_add(len)
            .filter(|e| *e <= self.buf.len())
            .ok_or(TcbInfoError::Truncated(self.pos))?;
        let content = &self.buf[self.pos..end];
        self.pos = end;
        Ok((tag, content))
    }
}

fn utf8(c: &[u8]) -> Result<String, TcbInfoError> {
    String::from_utf8(c.to_vec()).map_err(|_| TcbInfoError::Invalid("string is not UTF-8"))
}

fn uint(c: &[u8]) -> Result<u64, TcbInfoError> {
    if c.is_empty() || c[0] & 0x80 != 0 {
        return Err(TcbInfoError::Invalid("integer is empty or negative"));
    }
    let c = if c.len() > 1 && c[0] == 0 { &c[1..] } else { c };
    if c.len() > 8 {
        return Err(TcbInfoError::Invalid("integer does not fit in 64 bits"));
    }
    Ok(c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
}

fn oid_arcs(c: &[u8]) -> Result<Vec<u64>, TcbInfoError> {
    let mut values = Vec::new();
    let mut v: u64 = 0;
    for (i, b) in c.iter().enumerate() {
        if v > (u64::MAX >> 7) {
            return Err(TcbInfoError::Invalid("OID arc too large"));
        }
        v = (v << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            values.push(v);
            v = 0;
        } else if i == c.len() - 1 {
            return Err(TcbInfoError::Invalid("OID ends inside an arc"));
        }
    }
    let Some((&first, rest)) = values.split_first() else {
        return Err(TcbInfoError::Invalid("empty OID"));
    };
    let (a, b) = match first {
        0..=39 => (0, first),
        40..=79 => (1, first - 40),
        _ => (2, first - 80),
    };
    let mut arcs = vec![a, b];
    arcs.extend_from_slice(rest);
    Ok(arcs)
}

fn fwid_list(c: &[u8]) -> Result<Vec<TcbFwid>, TcbInfoError> {
    let mut list = Vec::new();
    let mut r = Reader { buf: c, pos: 0 };
    while !r.done() {
        let at = r.pos;
        let (tag, body) = r.tlv()?;
        if tag != 0x30 {
            return Err(TcbInfoError::UnexpectedTag {
                expected: "FWID SEQUENCE",
                at,
                found: tag,
            });
        }
        let mut f = Reader { buf: body, pos: 0 };
        let (t1, oid) = f.tlv()?;
        let (t2, digest) = f.tlv()?;
        if t1 != 0x06 || t2 != 0x04 || !f.done() {
            return Err(TcbInfoError::Invalid(
                "FWID is not { OBJECT IDENTIFIER, OCTET STRING }",
            ));
        }
        list.push(TcbFwid {
            hash_alg: oid_arcs(oid)?,
            digest: digest.to_vec(),
        });
    }
    if list.is_empty() {
        return Err(TcbInfoError::Invalid("empty FWID list"));
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Azure/Project-Cerberus: core/testing/asn1/dice/x509_extension_builder_dice_tcbinfo_test.c
    // (quoted in reference/dice-x509.md §2.2): version "1.2.3.4", svn 0x12345678, one
    // SHA-256 FWID.
    const CERBERUS_DIGEST: &str =
        "8869de579dd0e905e0a711245755 94f50a03d3d9cdf16e9a3f9d6c60c0324b54";
    const CERBERUS_TCBINFO: &str =
        "3040820731 2e322e332e34 8304 12345678 a62f 302d 0609 608648016503040201 \
         0420 8869de579dd0e905e0a71124575594f50a03d3d9cdf16e9a3f9d6c60c0324b54";

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        hex::decode(s).unwrap()
    }

    fn cerberus() -> TcbInfo {
        TcbInfo {
            version: Some("1.2.3.4".into()),
            svn: Some(0x1234_5678),
            fwids: vec![TcbFwid::sha256(unhex(CERBERUS_DIGEST).try_into().unwrap())],
            ..TcbInfo::default()
        }
    }

    #[test]
    fn encoder_reproduces_the_project_cerberus_vector_byte_for_byte() {
        assert_eq!(
            hex::encode(cerberus().to_der()),
            hex::encode(unhex(CERBERUS_TCBINFO))
        );
    }

    #[test]
    fn svn_zero_and_high_bit_values_are_minimal_positive_integers() {
        let zero = TcbInfo {
            svn: Some(0),
            ..TcbInfo::default()
        };
        assert_eq!(zero.to_der(), vec![0x30, 0x03, 0x83, 0x01, 0x00]);
        let high = TcbInfo {
            layer: Some(0x80),
            ..TcbInfo::default()
        };
        assert_eq!(high.to_der(), vec![0x30, 0x04, 0x84, 0x02, 0x00, 0x80]);
    }

    #[test]
    fn decoder_round_trips_every_modelled_field() {
        let mut info = cerberus();
        info.vendor = Some("Acme".into());
        info.model = Some("Board-7".into());
        info.layer = Some(1);
        info.index = Some(u64::MAX);
        info.vendor_info = Some(vec![1, 2, 3]);
        info.tcb_type = Some(b"FW".to_vec());
        info.fwids.push(TcbFwid {
            hash_alg: vec![2, 16, 840, 1, 101, 3, 4, 2, 2],
            digest: vec![0xab; 48],
        });
        let back = TcbInfo::from_der(&info.to_der()).unwrap();
        assert_eq!(back, info);
        assert_eq!(back.sha256_fwid().unwrap().to_vec(), unhex(CERBERUS_DIGEST));
        let cerberus_back = TcbInfo::from_der(&unhex(CERBERUS_TCBINFO)).unwrap();
        assert_eq!(cerberus_back, cerberus());
    }

    #[test]
    fn long_lengths_are_encoded_in_long_form() {
        let info = TcbInfo {
            vendor_info: Some(vec![7; 300]),
            ..TcbInfo::default()
        };
        let der = info.to_der();
        assert_eq!(&der[..4], &[0x30, 0x82, 0x01, 0x30]);
        assert_eq!(&der[4..8], &[0x88, 0x82, 0x01, 0x2c]);
        assert_eq!(TcbInfo::from_der(&der).unwrap(), info);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let good = cerberus().to_der();
        for cut in 0..good.len() {
            assert!(TcbInfo::from_der(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(
            TcbInfo::from_der(&[0x31, 0x00]),
            Err(TcbInfoError::UnexpectedTag { .. })
        ));
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(TcbInfo::from_der(&trailing).is_err());
        // An empty FWID list is not allowed (SIZE (1..MAX)).
        assert!(TcbInfo::from_der(&[0x30, 0x02, 0xa6, 0x00]).is_err());
    }
}
