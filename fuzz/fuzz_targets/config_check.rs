//! `perkflow check` on a config: any text gives a checked config or diagnostics, never a
//! panic. Secrets are not read and nothing touches the network (as in `check`).
//!
//! The file sits in an empty directory, so only what the text names is read from disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::LazyLock;

static FILE: LazyLock<(tempfile::TempDir, PathBuf)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("perkflow.yaml");
    (dir, file)
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match perkflow::config::load_text(&FILE.1, true, text) {
        Ok(cfg) => {
            // What `serve` does next without secrets: every source's settings are coherent.
            for (name, src) in &cfg.sources {
                assert_eq!(name, &src.name);
            }
        }
        Err(diags) => {
            assert!(!diags.is_empty(), "refused without a diagnostic");
            let shown = diags.to_string();
            assert!(!shown.is_empty());
        }
    }
});
