//! DICE derivation (CDI, DeviceID and Alias keys) and certificate issuance with rcgen.
