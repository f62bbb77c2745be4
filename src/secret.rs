//! Key bytes: held only in zeroizing memory, never printable.

use zeroize::Zeroizing;

/// A passphrase read from the key volume. Opaque bytes: never trimmed, never extended (ADE writes
/// base64 without a newline and the whole file is the passphrase).
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        Secret(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Debug never shows content, so a `{:?}` in an error path cannot leak a key.
impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_bytes() {
        let s = Secret::new(Zeroizing::new(b"hunter2".to_vec()));
        assert_eq!(format!("{s:?}"), "Secret(7 bytes)");
    }
}
