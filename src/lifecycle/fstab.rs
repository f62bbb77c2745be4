//! `/etc/fstab`, parsed so that it can be written back byte for byte.
//!
//! `enable` changes one field (the device) of a few lines and `disable` puts it back; everything
//! else an operator wrote (comments, spacing, tabs, a missing final newline, lines initcrypt does
//! not understand the purpose of) must survive untouched. So every line keeps its raw text and
//! entries remember where each field starts and ends; an edit replaces one field's bytes only.
//!
//! Parsing is strict where a mistake could touch the wrong disk: an entry with fewer than three
//! or more than six fields, or a non-numeric dump/pass field, fails the whole file with its line
//! number (libmount would skip or misread such a line; initcrypt refuses to guess).

use std::ops::Range;

use super::tabfile::{content_of, fields_of, is_blank};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("line {line}: {why}; fix that line (man 5 fstab) and run again — nothing was changed")]
    Malformed { line: usize, why: String },
}

/// One line of the file, with its terminator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    raw: String,
    /// Byte ranges of the fields in `raw`, empty for comments and blank lines.
    fields: Vec<Range<usize>>,
}

impl Line {
    pub fn raw(&self) -> &str {
        &self.raw
    }

    pub fn is_entry(&self) -> bool {
        !self.fields.is_empty()
    }

    fn field(&self, i: usize) -> Option<&str> {
        self.fields.get(i).map(|r| &self.raw[r.clone()])
    }
}

/// An entry's fields, unescaped (`\040` is a space).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Index of the line in the file (0-based); `line + 1` is what editors show.
    pub line: usize,
    pub spec: String,
    pub target: String,
    pub fstype: String,
    pub options: String,
    pub freq: Option<u32>,
    pub passno: Option<u32>,
}

impl Entry {
    /// Mount options as a list (`defaults` included as written).
    pub fn option_list(&self) -> Vec<&str> {
        self.options.split(',').filter(|o| !o.is_empty()).collect()
    }

    pub fn has_option(&self, name: &str) -> bool {
        self.option_list()
            .iter()
            .any(|o| *o == name || o.split_once('=').is_some_and(|(k, _)| k == name))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fstab {
    lines: Vec<Line>,
}

/// Undo fstab's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = (oct[0] - b'0') as u32 * 64
                    + (oct[1] - b'0') as u32 * 8
                    + (oct[2] - b'0') as u32;
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Escape what would split or end a field.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\r' => out.push_str("\\015"),
            '\\' => out.push_str("\\134"),
            '#' if out.is_empty() => out.push_str("\\043"),
            c => out.push(c),
        }
    }
    out
}

fn parse_line(raw: &str, index: usize) -> Result<Line, Error> {
    let content = content_of(raw);
    let fields = fields_of(raw);
    if fields.is_empty() {
        return Ok(Line {
            raw: raw.to_string(),
            fields,
        });
    }
    let bad = |why: String| Error::Malformed {
        line: index + 1,
        why,
    };
    if fields.len() < 3 {
        return Err(bad(format!(
            "{} field(s); an entry needs at least a device, a mount point and a type",
            fields.len()
        )));
    }
    if fields.len() > 6 {
        return Err(bad(format!(
            "{} fields; an entry has at most six (device, mount point, type, options, dump, pass)",
            fields.len()
        )));
    }
    for (i, name) in [(4, "dump"), (5, "pass")] {
        if let Some(r) = fields.get(i) {
            let f = &content[r.clone()];
            if f.parse::<u32>().is_err() {
                return Err(bad(format!("the {name} field \"{f}\" is not a number")));
            }
        }
    }
    Ok(Line {
        raw: raw.to_string(),
        fields,
    })
}

impl Fstab {
    pub fn parse(text: &str) -> Result<Fstab, Error> {
        let lines = text
            .split_inclusive('\n')
            .enumerate()
            .map(|(i, raw)| parse_line(raw, i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Fstab { lines })
    }

    /// The file as text: exactly what was parsed, plus the edits made.
    pub fn render(&self) -> String {
        self.lines.iter().map(|l| l.raw.as_str()).collect()
    }

    pub fn lines(&self) -> &[Line] {
        &self.lines
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_entry())
            .map(|(i, l)| entry_of(i, l))
            .collect()
    }

    /// The first entry mounted at `target` (e.g. "/", "/boot").
    pub fn entry_for_target(&self, target: &str) -> Option<Entry> {
        self.entries()
            .into_iter()
            .find(|e| normalise_target(&e.target) == normalise_target(target))
    }

    /// Replace the device field of entry `line` (an index from `Entry::line`) with `spec`;
    /// every other byte of the file stays as it was.
    pub fn set_spec(&mut self, line: usize, spec: &str) {
        self.set_raw_spec(line, &escape(spec));
    }

    /// Like `set_spec`, with a field already escaped as fstab wants it (a line of the backup).
    pub fn set_raw_spec(&mut self, line: usize, new: &str) {
        let Some(l) = self.lines.get_mut(line) else {
            return;
        };
        let Some(r) = l.fields.first().cloned() else {
            return;
        };
        if new.is_empty() || new.contains(is_blank) || new.contains('\n') {
            return;
        }
        let delta = new.len() as isize - r.len() as isize;
        l.raw.replace_range(r.clone(), new);
        for (i, f) in l.fields.iter_mut().enumerate() {
            if i == 0 {
                f.end = f.start + new.len();
            } else {
                f.start = (f.start as isize + delta) as usize;
                f.end = (f.end as isize + delta) as usize;
            }
        }
    }

    /// The raw device field of entry `line`, as written (still escaped).
    pub fn raw_spec(&self, line: usize) -> Option<&str> {
        self.lines.get(line).and_then(|l| l.field(0))
    }
}

fn entry_of(index: usize, l: &Line) -> Entry {
    let f = |i| l.field(i).unwrap_or("");
    Entry {
        line: index,
        spec: unescape(f(0)),
        target: unescape(f(1)),
        fstype: f(2).to_string(),
        options: if l.fields.len() > 3 {
            f(3).to_string()
        } else {
            "defaults".into()
        },
        freq: l.field(4).and_then(|s| s.parse().ok()),
        passno: l.field(5).and_then(|s| s.parse().ok()),
    }
}

/// "/data/" and "/data" are the same mount point.
pub fn normalise_target(t: &str) -> String {
    let trimmed = t.trim_end_matches('/');
    if trimmed.is_empty() && t.starts_with('/') {
        "/".into()
    } else {
        trimmed.to_string()
    }
}

/// True when `inner` lies strictly inside mount point `outer` (`/data3/x` inside `/data3`).
pub fn is_inside(inner: &str, outer: &str) -> bool {
    let (i, o) = (normalise_target(inner), normalise_target(outer));
    if o == "/" {
        return i != "/" && i.starts_with('/');
    }
    i.len() > o.len() && i.starts_with(&o) && i.as_bytes()[o.len()] == b'/'
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "# /etc/fstab: static file system information.\n\
UUID=1111-aaaa /               ext4    errors=remount-ro 0       1\n\
UUID=2222\t/boot\text4\tdefaults\t0\t2\n\
\n\
   # indented comment\n\
/dev/sdc1 /data\\040one xfs defaults,nofail 0 2 \n\
LABEL=BEK\\040VOLUME /mnt/azure_bek_disk auto defaults,discard,nofail 0 0\n\
tmpfs /tmp tmpfs mode=1777\n\
/swapfile none swap sw 0 0";

    #[test]
    fn round_trip_is_byte_identical() {
        let f = Fstab::parse(SAMPLE).unwrap();
        assert_eq!(f.render(), SAMPLE);
        let e = f.entries();
        assert_eq!(e.len(), 6);
        assert_eq!(e[2].target, "/data one");
        assert_eq!(e[2].line, 5);
        assert!(e[2].has_option("nofail"));
        assert_eq!(e[3].spec, "LABEL=BEK VOLUME");
        assert_eq!(e[4].options, "mode=1777");
        assert_eq!(e[4].passno, None);
    }

    #[test]
    fn set_spec_changes_only_the_device_field() {
        let mut f = Fstab::parse(SAMPLE).unwrap();
        f.set_spec(5, "/dev/mapper/data-x");
        f.set_spec(2, "UUID=2222 with space");
        let out = f.render();
        let old: Vec<&str> = SAMPLE.split_inclusive('\n').collect();
        let new: Vec<&str> = out.split_inclusive('\n').collect();
        assert_eq!(old.len(), new.len());
        for (i, (a, b)) in old.iter().zip(&new).enumerate() {
            match i {
                5 => assert_eq!(
                    *b,
                    "/dev/mapper/data-x /data\\040one xfs defaults,nofail 0 2 \n"
                ),
                2 => assert_eq!(
                    *b,
                    "UUID=2222\\040with\\040space\t/boot\text4\tdefaults\t0\t2\n"
                ),
                _ => assert_eq!(a, b),
            }
        }
        let again = Fstab::parse(&out).unwrap();
        assert_eq!(again.entries()[2].spec, "/dev/mapper/data-x");
        assert_eq!(again.entries()[1].spec, "UUID=2222 with space");
        // and back: the original line, byte for byte
        let mut back = again.clone();
        back.set_spec(5, "/dev/sdc1");
        back.set_spec(2, "UUID=2222");
        assert_eq!(back.render(), SAMPLE);
    }

    #[test]
    fn malformed_lines_name_their_number() {
        for (text, line) in [
            ("UUID=a / ext4 defaults 0 1\n/dev/sdb1 /data\n", 2),
            ("/dev/sdb1 /data xfs defaults x 2\n", 1),
            ("a b c d 0 0 extra\n", 1),
            ("a b c d 0 z", 1),
        ] {
            match Fstab::parse(text) {
                Err(Error::Malformed { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn nesting() {
        assert!(is_inside("/data3/data4", "/data3"));
        assert!(is_inside("/data3/data4", "/data3/"));
        assert!(!is_inside("/data30", "/data3"));
        assert!(!is_inside("/data3", "/data3"));
        assert!(is_inside("/mnt/x", "/mnt"));
        assert!(is_inside("/x", "/"));
    }

    #[test]
    fn escapes() {
        assert_eq!(unescape("a\\040b\\134c\\011"), "a b\\c\t");
        assert_eq!(unescape("trail\\04"), "trail\\04");
        assert_eq!(escape("a b\\c"), "a\\040b\\134c");
        assert_eq!(unescape(&escape("# x\ty\\z")), "# x\ty\\z");
    }
}
