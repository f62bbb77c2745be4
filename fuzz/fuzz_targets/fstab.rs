//! The fstab parser on hostile input: never a panic, and the properties enable/disable rely on:
//! parse → render is byte-identical; changing one entry's device field changes that field only
//! (the line count, every other line and the entry's other fields stay); putting the old field
//! back gives the original file. Run with `scripts/fuzz`.
#![no_main]

use initcrypt::lifecycle::fstab::{self, Fstab};
use libfuzzer_sys::fuzz_target;

/// Device fields to write: a mapping, one that needs escaping, one that would start a comment.
const NEW: [&str; 3] = ["/dev/mapper/data0_1", "UUID=a b\tc\\d", "#x"];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = Fstab::parse(text) else {
        return;
    };
    assert_eq!(parsed.render(), text, "render(parse(x)) != x");
    let entries = parsed.entries();
    for (i, e) in entries.iter().enumerate().take(4) {
        let _ = (fstab::normalise_target(&e.target), e.option_list(), e.has_option("nofail"));
        for prev in entries.iter().take(i) {
            let _ = fstab::is_inside(&e.target, &prev.target);
        }
        let new = NEW[i % NEW.len()];
        let mut edited = parsed.clone();
        edited.set_spec(e.line, new);
        let out = edited.render();
        let again = Fstab::parse(&out).expect("an edited file must parse again");
        let after = again.entries();
        assert_eq!(after.len(), entries.len());
        assert_eq!(after[i].spec, new, "the new device field reads back");
        assert_eq!(
            (&after[i].target, &after[i].fstype, &after[i].options, after[i].freq, after[i].passno),
            (&e.target, &e.fstype, &e.options, e.freq, e.passno),
            "other fields unchanged"
        );
        assert_eq!(again.lines().len(), parsed.lines().len());
        for (j, (a, b)) in parsed.lines().iter().zip(again.lines()).enumerate() {
            assert!(j == e.line || a.raw() == b.raw(), "line {} changed", j + 1);
        }
        let mut back = again.clone();
        back.set_raw_spec(e.line, parsed.raw_spec(e.line).unwrap());
        assert_eq!(back.render(), text, "restoring the raw field gives the original");
    }
});
