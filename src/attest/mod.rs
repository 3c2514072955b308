//! Board attestation: TPM endorsement keys (`tpm`), DICE derivation and certificates
//! (`dice`), and X.509 checks of CA and device certificates (`x509`).
pub mod dice;
pub mod tpm;
pub mod x509;
