//! Replays every fuzz target's inputs through the same harness (`edgestream::fuzzing`): the
//! committed seeds and past crashes (`fuzz/seeds/<target>/`) always, and the local corpus
//! (`fuzz/corpus/<target>/`, grown by `scripts/fuzz-smoke`) when present. A crash found by
//! fuzzing and fixed stays fixed: its input is a seed.

use std::path::Path;

#[test]
fn every_seed_and_corpus_input_passes_its_harness() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut seeds = 0;
    for (target, harness) in edgestream::fuzzing::TARGETS {
        for dir in ["seeds", "corpus"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
                assert_ne!(dir, "seeds", "{target} has no seeds");
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| harness(&data));
                assert!(outcome.is_ok(), "{target}: {} fails", path.display());
                if dir == "seeds" {
                    seeds += 1;
                }
            }
        }
    }
    assert!(seeds >= edgestream::fuzzing::TARGETS.len(), "{seeds} seeds");
}
