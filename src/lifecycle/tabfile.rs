//! The line grammar fstab(5) and crypttab(5) share: whitespace-separated fields, `#` comments and
//! blank lines kept byte for byte. One place, so the two parsers cannot disagree on what a field is.

use std::ops::Range;

pub fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t' || c == '\r'
}

/// A line without its terminator.
pub fn content_of(raw: &str) -> &str {
    raw.strip_suffix('\n').unwrap_or(raw)
}

/// Byte ranges of the fields of `raw` (terminator excluded); empty for a blank or comment line.
pub fn fields_of(raw: &str) -> Vec<Range<usize>> {
    let content = content_of(raw);
    let first = content.trim_start_matches(is_blank);
    if first.is_empty() || first.starts_with('#') {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in content.char_indices() {
        match (is_blank(c), start) {
            (true, Some(s)) => {
                out.push(s..i);
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push(s..content.len());
    }
    out
}
