//! SCRAM, verifiers and the verifier cache.
