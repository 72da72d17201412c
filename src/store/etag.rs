//! `ETag`: names one version of an object, as the store sent it.

use std::hash::{Hash, Hasher};

/// An object's ETag, kept as the store sent it (quoted, as `If-Match` wants it back) and
/// compared by its value within the quotes, as stores differ on quoting. As small as the
/// text it holds: listings keep one per name.
#[derive(Clone, Debug, Eq)]
pub struct ETag(Box<str>);

impl ETag {
    pub fn new(text: impl Into<Box<str>>) -> ETag {
        ETag(text.into())
    }

    /// As the store sent it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its value within the quotes: for an MD5 ETag, the hex digest (with `-N` after a
    /// multipart upload of N parts).
    pub fn value(&self) -> &str {
        self.0.trim_matches('"')
    }

    /// The MD5 digest a single-part upload's ETag is, when it is one.
    pub fn md5_hex(&self) -> Option<&str> {
        let v = self.value();
        (v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit())).then_some(v)
    }
}

impl PartialEq for ETag {
    fn eq(&self, other: &ETag) -> bool {
        self.value() == other.value()
    }
}

impl Hash for ETag {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.value().hash(state)
    }
}

impl std::fmt::Display for ETag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_or_not_it_is_one_version() {
        let quoted = ETag::new("\"d41d8cd98f00b204e9800998ecf8427e\"");
        let bare = ETag::new("d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(quoted, bare);
        assert_eq!(quoted.as_str(), "\"d41d8cd98f00b204e9800998ecf8427e\"");
        assert_eq!(quoted.md5_hex(), Some("d41d8cd98f00b204e9800998ecf8427e"));
        assert_eq!(ETag::new("\"abc-3\"").md5_hex(), None);
        assert_ne!(ETag::new("\"a\""), ETag::new("\"b\""));
    }
}
