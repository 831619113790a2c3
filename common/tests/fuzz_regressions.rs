//! Replays every input kept in `common/fuzz/regressions/` (inputs fuzzing found that once
//! crashed, and hand-made edge cases) through the fuzz entry points: each must return.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&bytes));
        assert!(outcome.is_ok(), "{} panicked", path.display());
        replayed += 1;
    }
    replayed
}

#[test]
fn gguf_regressions_are_refused_without_panicking() {
    assert!(replay("gguf", realm_common::fuzzing::gguf) > 0);
}

#[test]
fn wire_regressions_are_refused_without_panicking() {
    assert!(replay("wire", realm_common::fuzzing::wire) > 0);
}
