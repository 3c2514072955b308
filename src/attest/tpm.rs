//! TPM endorsement-key reading through tss-esapi (DESIGN.md §6, reference/tpm-ek.md).
