//! Board attestation: TPM endorsement keys (`tpm`), DICE derivation and certificates
//! (`dice`), and X.509 checks of CA and device certificates (`x509`).
pub mod ca;
pub mod dice;
pub mod fixed_base;
pub mod swtpm;
pub mod tcbinfo;
pub mod tpm;
pub mod x509;
