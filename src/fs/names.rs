//! Mapping between paths in the mount and keys in the bucket, and the rules for which
//! names are allowed on either side.
//!
//! A file at `<mount>/a/b/c` is the object `<prefix>a/b/c`; a directory `a/b` is implied by
//! any key starting with `<prefix>a/b/`, and `<prefix>a/b/` itself is its marker object.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use super::error::{FsError, FsResult};

/// Longest name of one path component, in bytes.
pub const MAX_NAME: usize = 255;
/// Longest object key S3 accepts, in bytes.
pub const MAX_KEY: usize = 1024;

/// Checks a name the kernel passed in (one path component) and returns it as UTF-8.
pub fn component(name: &OsStr) -> FsResult<&str> {
    let bytes = name.as_bytes();
    if bytes.len() > MAX_NAME {
        return Err(FsError::NAMETOOLONG);
    }
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(FsError::INVAL);
    }

    // Object keys are UTF-8; a name that is not cannot be stored.
    std::str::from_utf8(bytes).map_err(|_| FsError::INVAL)
}

/// `component`, for a name this mount is to create. S3 answers in XML, which cannot carry
/// control characters: an object named with one breaks multipart uploads, batch deletes,
/// and other tools' listings, so such a name is refused (one another tool stored is still
/// listed, read, renamed away and deleted).
pub fn new_component(name: &OsStr) -> FsResult<&str> {
    let name = component(name)?;
    if !xml_safe(name) {
        return Err(FsError::INVAL);
    }
    Ok(name)
}

/// Whether the XML of S3's requests and answers can carry `s` unchanged: no control
/// character (XML has tab and line ends, but its parsers change them), nor U+FFFE or U+FFFF.
pub fn xml_safe(s: &str) -> bool {
    !s.chars()
        .any(|c| c.is_ascii_control() || c == '\u{FFFE}' || c == '\u{FFFF}')
}

/// The path of `name` inside the directory at `parent` ("" is the root).
pub fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// The parent path and final name of a path ("" for the root's children).
pub fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

/// Maps mount paths to object keys under one prefix.
#[derive(Debug, Clone)]
pub struct KeyMap {
    prefix: String,
}

impl KeyMap {
    pub fn new(prefix: &str) -> Self {
        KeyMap {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key of the file at `path`, or ENAMETOOLONG when S3 could not store it.
    pub fn file_key(&self, path: &str) -> FsResult<String> {
        let key = format!("{}{}", self.prefix, path);
        if key.len() > MAX_KEY {
            return Err(FsError::NAMETOOLONG);
        }
        Ok(key)
    }

    /// The prefix under which the children of directory `path` live; also the key of its
    /// marker object.
    pub fn dir_prefix(&self, path: &str) -> String {
        if path.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}{}/", self.prefix, path)
        }
    }
}

/// Whether a name found in the bucket can be shown as a directory entry. Keys such as
/// `a//b`, or with `.` or `..` components, or components over 255 bytes, cannot be a path.
pub fn listable(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= MAX_NAME
        && !name.contains('\0')
        && !name.contains('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_prefix_verbatim() {
        let m = KeyMap::new("media/");
        assert_eq!(
            m.file_key("remote_content/[::1]:8448/ab/cd/x").unwrap(),
            "media/remote_content/[::1]:8448/ab/cd/x"
        );
        assert_eq!(m.dir_prefix(""), "media/");
        assert_eq!(m.dir_prefix("a/b"), "media/a/b/");
        assert_eq!(split("a/b/c"), ("a/b", "c"));
        assert_eq!(split("c"), ("", "c"));
    }

    #[test]
    fn long_names_and_keys_are_refused() {
        let long = "x".repeat(256);
        assert!(component(OsStr::new(&long))
            .unwrap_err()
            .is(libc::ENAMETOOLONG));
        assert!(component(OsStr::new(&"x".repeat(255))).is_ok());
        let m = KeyMap::new("");
        assert!(m
            .file_key(&"y".repeat(1025))
            .unwrap_err()
            .is(libc::ENAMETOOLONG));
        assert!(m.file_key(&"y".repeat(1024)).is_ok());
    }

    #[test]
    fn unpathable_names_are_not_listed() {
        for bad in ["", ".", ".."] {
            assert!(!listable(bad));
        }
        for good in ["a b", "x:y[1]", "%2F+", "ünï"] {
            assert!(listable(good));
        }
    }
}
