//! Fuzzes the `/v1/stream` query string (orgs, since lists): `edgestream::fuzzing::connect_query` (the same harness replays the seeds
//! and corpus in `tests/fuzz_corpus.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| edgestream::fuzzing::connect_query(data));
