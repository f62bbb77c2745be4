//! `/etc/crypttab` of the real root, parsed so that it can be written back byte for byte.
//!
//! initcrypt writes no crypttab line of its own (see `enable`: every volume is opened in the
//! initramfs and stays open across the switch to the real root). It reads the file to find lines
//! other tools wrote for the volumes it manages (ADE's `osencrypt … luks,discard,header=…`), and
//! `disable` removes those lines for a volume it decrypts: once the disk is plaintext again such a
//! line would make a unit that fails at every boot. Like fstab, every line keeps its raw text.

use std::collections::BTreeSet;
use std::ops::Range;

use super::tabfile::fields_of;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "line {line}: {why}; fix that line (man 5 crypttab) and run again — nothing was changed"
    )]
    Malformed { line: usize, why: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    raw: String,
    fields: Vec<Range<usize>>,
}

/// One crypttab entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub line: usize,
    pub name: String,
    pub device: String,
    /// `none`, `-` or absent mean "no key file".
    pub key: Option<String>,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Crypttab {
    lines: Vec<Line>,
}

fn parse_line(raw: &str, index: usize) -> Result<Line, Error> {
    let fields = fields_of(raw);
    if !fields.is_empty() && !(2..=4).contains(&fields.len()) {
        return Err(Error::Malformed {
            line: index + 1,
            why: format!(
                "{} field(s); an entry is: name device [key file] [options]",
                fields.len()
            ),
        });
    }
    Ok(Line {
        raw: raw.to_string(),
        fields,
    })
}

impl Crypttab {
    pub fn parse(text: &str) -> Result<Crypttab, Error> {
        let lines = text
            .split_inclusive('\n')
            .enumerate()
            .map(|(i, raw)| parse_line(raw, i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Crypttab { lines })
    }

    pub fn render(&self) -> String {
        self.lines.iter().map(|l| l.raw.as_str()).collect()
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.lines
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.fields.is_empty())
            .map(|(i, l)| {
                let f = |n: usize| l.fields.get(n).map(|r| &l.raw[r.clone()]);
                let key = f(2)
                    .filter(|k| !matches!(*k, "none" | "-" | ""))
                    .map(str::to_string);
                Entry {
                    line: i,
                    name: f(0).unwrap_or("").to_string(),
                    device: f(1).unwrap_or("").to_string(),
                    key,
                    options: f(3)
                        .map(|o| {
                            o.split(',')
                                .filter(|s| !s.is_empty())
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    pub fn entry(&self, name: &str) -> Option<Entry> {
        self.entries().into_iter().find(|e| e.name == name)
    }

    /// Drop the entries for these mapping names; returns the removed lines, verbatim. Comments
    /// and every other line stay byte for byte.
    pub fn remove_names(&mut self, names: &BTreeSet<String>) -> Vec<String> {
        let mut removed = Vec::new();
        self.lines.retain(|l| {
            let name = l.fields.first().map(|r| &l.raw[r.clone()]);
            match name {
                Some(n) if names.contains(n) => {
                    removed.push(l.raw.clone());
                    false
                }
                _ => true,
            }
        });
        // A removed last line may have carried the only newline before an unterminated one:
        // nothing to fix, since each kept line keeps its own terminator.
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADE: &str = "# <target name> <source device> <key file> <options>\n\
osencrypt /dev/disk/by-partuuid/aa-bb /mnt/azure_bek_disk/LinuxPassPhraseFileName luks,discard,header=/boot/luks/osluksheader\n\
\n\
data1\tUUID=1234\tnone\tluks,nofail\n\
swapc /dev/sdz /dev/urandom swap";

    #[test]
    fn round_trip_and_fields() {
        let c = Crypttab::parse(ADE).unwrap();
        assert_eq!(c.render(), ADE);
        let e = c.entries();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].name, "osencrypt");
        assert!(e[0]
            .options
            .contains(&"header=/boot/luks/osluksheader".to_string()));
        assert_eq!(e[1].key, None);
        assert_eq!(e[2].options, ["swap"]);
    }

    #[test]
    fn remove_keeps_everything_else() {
        let mut c = Crypttab::parse(ADE).unwrap();
        let removed = c.remove_names(&["osencrypt".to_string()].into());
        assert_eq!(removed.len(), 1);
        assert!(removed[0].starts_with("osencrypt "));
        assert_eq!(c.render(), ADE.replacen(&removed[0], "", 1));
        let removed = c.remove_names(&["swapc".to_string()].into());
        assert_eq!(removed, ["swapc /dev/sdz /dev/urandom swap"]);
    }

    #[test]
    fn malformed() {
        assert!(matches!(
            Crypttab::parse("ok /dev/x\nonlyname\n"),
            Err(Error::Malformed { line: 2, .. })
        ));
        assert!(Crypttab::parse("a b c d e\n").is_err());
    }
}
