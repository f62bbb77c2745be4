//! volumes.json: the strict parser (config::parse) on hostile input never panics, and what it
//! accepts survives enable's writer: render(parse(x)) parses back to the same volumes, and
//! rendering is deterministic (enable twice writes the same bytes). Run with `scripts/fuzz`.
#![no_main]

use std::path::Path;

use initcrypt::config;
use initcrypt::lifecycle::volumes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(vols) = config::parse(text, Path::new("volumes.json")) else {
        return;
    };
    let out = volumes::render(&vols);
    let back = config::parse(&out, Path::new("volumes.json")).expect("what enable writes must parse");
    assert_eq!(back, vols, "parse(render(v)) != v");
    assert_eq!(volumes::render(&back), out, "rendering is not deterministic");
    let merged = volumes::merge(&vols, vols.clone());
    assert_eq!(merged.len(), vols.len());
});
