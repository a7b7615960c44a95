//! Fuzzes the JSON control messages: `edgestream_codec::fuzzing::json_client` (the same harness
//! replays the seeds and corpus in `tests/fuzz_corpus.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| edgestream_codec::fuzzing::json_client(data));
