//! The kernel command-line edits on hostile input: never a panic; applying a fix twice changes
//! nothing the second time (enable twice = same file); after a fix, no root= word the fix targets
//! is left on a command-line line; a text without root= or ADE words comes back byte for byte.
//! Run with `scripts/fuzz`.
#![no_main]

use initcrypt::lifecycle::bootcfg::{self, Fix};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for (mapping, ade) in [(false, false), (true, true)] {
        let fix = Fix {
            uuid: "7a3f0c1e-0000-4000-8000-00000000000a".into(),
            replace_mapping: mapping,
            drop_ade: ade,
        };
        let once = bootcfg::fix_grub_defaults(text, &fix);
        assert_eq!(bootcfg::fix_grub_defaults(&once, &fix), once, "defaults fix not idempotent");
        let line = bootcfg::fix_cmdline_file(text, &fix);
        assert_eq!(bootcfg::fix_cmdline_file(&line, &fix), line, "cmdline fix not idempotent");
        if let Some(r) = bootcfg::root_of(&line) {
            assert!(!matches!(bootcfg::classify(&r), bootcfg::RootArg::Partition), "root={r} left");
        }
        if !text.contains("root=") && !text.contains("rd.luks.ade.") {
            assert_eq!(line, text);
        }
    }
    let _ = bootcfg::grub_cfg_roots(text);
});
