//! The crypttab parser on hostile input: never a panic; parse → render is byte-identical; removing
//! the lines of one name removes exactly those entries and keeps every other byte. Run with
//! `scripts/fuzz`.
#![no_main]

use initcrypt::lifecycle::crypttab::Crypttab;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = Crypttab::parse(text) else {
        return;
    };
    assert_eq!(parsed.render(), text, "render(parse(x)) != x");
    let entries = parsed.entries();
    let Some(first) = entries.first() else {
        return;
    };
    let _ = parsed.entry(&first.name);
    let mut edited = parsed.clone();
    let removed = edited.remove_names(&[first.name.clone()].into());
    let same_name = entries.iter().filter(|e| e.name == first.name).count();
    assert_eq!(removed.len(), same_name);
    let out = edited.render();
    let again = Crypttab::parse(&out).expect("a file with lines removed must parse again");
    assert_eq!(again.entries().len(), entries.len() - same_name);
    assert!(again.entries().iter().all(|e| e.name != first.name));
    assert_eq!(out.len() + removed.iter().map(String::len).sum::<usize>(), text.len());
});
