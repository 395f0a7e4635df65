//! The committed policy corpus (`tests/corpus/policy/`): every `ok_*` file
//! parses, every `err_*` file is refused with at least one issue and no
//! panic, quickly (the alias bomb included). New crashers found by the
//! property tests belong here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn every_corpus_file_gets_the_expected_verdict() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/policy");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let started = Instant::now();
        let result = leash_api::policy::parse(&text, &dir);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{name} took {:?}",
            started.elapsed()
        );
        if name.starts_with("ok_") {
            assert!(result.is_ok(), "{name}: {:?}", result.err());
        } else {
            let issues = result
                .err()
                .unwrap_or_else(|| panic!("{name} was accepted"));
            assert!(!issues.is_empty(), "{name}");
        }
        seen += 1;
    }
    assert!(seen >= 10, "corpus present: {seen} files");
}
