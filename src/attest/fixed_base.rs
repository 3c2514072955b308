//! Fast P-256 public keys from secret scalars: a fixed-base comb over a precomputed table of
//! generator multiples, built on the `p256` crate's field and point arithmetic.
//!
//! Why: the p256 0.13 crate computes `d·G` with a generic variable-base ladder (about 140 µs
//! in release on the station); DICE issuance needs two per board and the budget is ≥ 3,000
//! boards/s on one core (DESIGN §9). The table holds `j·16^i·G` for the 64 four-bit windows
//! of a scalar (1,024 affine points, ~72 KiB, built once on first use), so `d·G` is 64 mixed
//! additions. Every window scans all 16 entries with constant-time selects, so neither the
//! memory access pattern nor the branch pattern depends on the secret.
//!
//! This module must never return a point other than `d·G` (the unit tests compare it with
//! the p256 crate for edge and random scalars), and never keeps scalar bytes after use.
use std::sync::OnceLock;

use p256::elliptic_curve::group::{Curve as _, Group as _};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::elliptic_curve::subtle::{ConditionallySelectable, ConstantTimeEq};
use p256::{AffinePoint, ProjectivePoint};
use zeroize::Zeroize;

const WINDOWS: usize = 64;

struct Table(Vec<[AffinePoint; 16]>);

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut rows = Vec::with_capacity(WINDOWS);
        let mut base = ProjectivePoint::GENERATOR;
        for _ in 0..WINDOWS {
            let mut proj = [ProjectivePoint::IDENTITY; 16];
            for j in 1..16 {
                proj[j] = proj[j - 1] + base;
            }
            let mut row = [AffinePoint::IDENTITY; 16];
            ProjectivePoint::batch_normalize(&proj, &mut row);
            rows.push(row);
            for _ in 0..4 {
                base = base.double();
            }
        }
        Table(rows)
    })
}

/// Build the table now (e.g. at daemon start) instead of on the first board.
pub fn warm_up() {
    let _ = table();
}

/// `d·G` for the secret key `d`, as an uncompressed SEC1 point (65 bytes).
pub fn public_key_uncompressed(secret: &p256::SecretKey) -> [u8; 65] {
    let t = table();
    let mut bytes: [u8; 32] = secret.to_bytes().into();
    let mut acc = ProjectivePoint::IDENTITY;
    for (i, row) in t.0.iter().enumerate() {
        let byte = bytes[31 - i / 2];
        let nibble = if i % 2 == 0 { byte & 0x0f } else { byte >> 4 };
        let mut sel = AffinePoint::IDENTITY;
        for (j, entry) in row.iter().enumerate().skip(1) {
            sel.conditional_assign(entry, (j as u8).ct_eq(&nibble));
        }
        acc += sel;
    }
    bytes.zeroize();
    let point = acc.to_affine().to_encoded_point(false);
    let mut out = [0u8; 65];
    // An uncompressed encoding of a non-identity point is always 65 bytes; d is non-zero
    // and below the group order, so d·G is never the identity.
    if point.as_bytes().len() == 65 {
        out.copy_from_slice(point.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(sk: &p256::SecretKey) -> Vec<u8> {
        sk.public_key().to_encoded_point(false).as_bytes().to_vec()
    }

    #[test]
    fn matches_the_p256_crate_for_edge_and_random_scalars() {
        let n_minus_1 =
            hex::decode("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632550")
                .unwrap();
        let mut cases: Vec<Vec<u8>> = vec![
            {
                let mut one = vec![0u8; 32];
                one[31] = 1;
                one
            },
            {
                let mut v = vec![0u8; 32];
                v[0] = 0x80;
                v
            },
            vec![0x0f; 32],
            vec![0x10; 32],
            n_minus_1,
        ];
        for i in 0..40u8 {
            let mut v = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut v);
            v[0] &= 0x7f;
            v[i as usize % 32] = i; // some zero nibbles too
            cases.push(v.to_vec());
        }
        for c in cases {
            let sk = p256::SecretKey::from_slice(&c).unwrap();
            assert_eq!(
                public_key_uncompressed(&sk).to_vec(),
                reference(&sk),
                "{}",
                hex::encode(&c)
            );
        }
    }
}
