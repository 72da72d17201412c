//! Credentials and key files: access keys from `--credentials FILE`, the environment or the
//! AWS shared credentials file, and the SSE-C key; each file must be private to its owner.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Access keys, with a `Debug` that never shows the secret.
#[derive(Clone)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
    /// Where they came from, for messages.
    pub source: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials {{ access_key: {:?}, from: {} }}",
            self.access_key, self.source
        )
    }
}

/// Credentials from, in order: `--credentials FILE`, the environment, the shared
/// credentials file.
pub(super) fn resolve_credentials(
    file: Option<&Path>,
    profile: Option<&str>,
) -> Result<Credentials, String> {
    if let Some(path) = file {
        return read_key_file(path);
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(access_key), Some(secret_key)) =
        (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
    {
        return Ok(Credentials {
            access_key,
            secret_key,
            session_token: env("AWS_SESSION_TOKEN"),
            source: "the environment".into(),
        });
    }
    let shared = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")));
    let profile = profile.unwrap_or("default");
    if let Some(path) = shared.filter(|p| p.exists()) {
        return read_shared_file(&path, profile);
    }
    Err(
        "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, pass \
         --credentials FILE (a KEY:SECRET file, mode 0600), or add a profile to \
         ~/.aws/credentials"
            .into(),
    )
}

/// The SSE-C key: 32 bytes, raw or in base64, in a file only its owner can read.
pub(super) fn read_customer_key(path: &Path) -> Result<[u8; 32], String> {
    check_private(path, "the SSE-C key file")?;
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the SSE-C key file {}: {e}", path.display()))?;
    let key = if bytes.len() == 32 {
        Some(bytes)
    } else {
        decode_base64(std::str::from_utf8(&bytes).unwrap_or("").trim())
    };
    key.and_then(|k| <[u8; 32]>::try_from(k).ok()).ok_or_else(|| {
        format!(
            "the SSE-C key file {} does not hold a 32-byte key (raw, or in base64); make one with `head -c 32 /dev/urandom > FILE`",
            path.display()
        )
    })
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let text = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

/// Refuses the secrets file `path` (`what` names it in messages) unless only its owner can
/// read it.
fn check_private(path: &Path, what: &str) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{what} {} can be read by other users (mode {:04o}); run `chmod 600 {}`",
            path.display(),
            meta.mode() & 0o7777,
            path.display()
        ));
    }
    Ok(())
}

fn read_key_file(path: &Path) -> Result<Credentials, String> {
    check_private(path, "the credentials file")?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the credentials file {}: {e}", path.display()))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'));
    match line.and_then(|l| l.split_once(':')) {
        Some((k, s)) if !k.is_empty() && !s.is_empty() => Ok(Credentials {
            access_key: k.to_string(),
            secret_key: s.to_string(),
            session_token: None,
            source: path.display().to_string(),
        }),
        _ => Err(format!(
            "the credentials file {} must hold one line ACCESS_KEY:SECRET_KEY",
            path.display()
        )),
    }
}

fn read_shared_file(path: &Path, profile: &str) -> Result<Credentials, String> {
    check_private(path, "the credentials file")?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut in_profile = false;
    let (mut key, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') && line.ends_with(']') {
            let name = line[1..line.len() - 1].trim();
            in_profile = name == profile || name == format!("profile {profile}");
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = Some(v.trim().to_string());
            match k.trim() {
                "aws_access_key_id" => key = v,
                "aws_secret_access_key" => secret = v,
                "aws_session_token" => token = v,
                _ => {}
            }
        }
    }
    match (key, secret) {
        (Some(access_key), Some(secret_key)) => Ok(Credentials {
            access_key,
            secret_key,
            session_token: token,
            source: format!("{} [{profile}]", path.display()),
        }),
        _ => Err(format!(
            "{} has no aws_access_key_id and aws_secret_access_key in profile [{profile}]",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A file holding `text`, with permission bits `mode`, in a directory kept by the caller.
    fn file(dir: &tempfile::TempDir, name: &str, text: &[u8], mode: u32) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_key_file_holds_one_line_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let good = file(&dir, "good", b"# media bucket\n\nAKID:s3cr3t\n", 0o600);
        let c = resolve_credentials(Some(&good), Some("ignored")).unwrap();
        assert_eq!(
            (c.access_key.as_str(), c.secret_key.as_str()),
            ("AKID", "s3cr3t")
        );
        assert_eq!(c.source, good.display().to_string());
        let cases: &[(&[u8], u32, &str)] = &[
            (b"AKID:s3cr3t\n", 0o644, "chmod 600"),
            (b"AKID:s3cr3t\n", 0o640, "can be read by other users"),
            (
                b"AKID s3cr3t\n",
                0o600,
                "must hold one line ACCESS_KEY:SECRET_KEY",
            ),
            (
                b"AKID:\n",
                0o600,
                "must hold one line ACCESS_KEY:SECRET_KEY",
            ),
            (b"", 0o600, "must hold one line ACCESS_KEY:SECRET_KEY"),
        ];
        for (i, (text, mode, expect)) in cases.iter().enumerate() {
            let path = file(&dir, &format!("bad{i}"), text, *mode);
            let e = resolve_credentials(Some(&path), None).unwrap_err();
            assert!(e.contains(expect), "case {i}: {e}");
        }
        let missing = dir.path().join("missing");
        let e = resolve_credentials(Some(&missing), None).unwrap_err();
        assert!(e.contains("cannot read the credentials file"), "{e}");
    }

    #[test]
    fn the_shared_file_is_read_by_profile() {
        let dir = tempfile::tempdir().unwrap();
        let text = b"[default]\naws_access_key_id = D\naws_secret_access_key = DS\n\n\
            [profile media]\naws_access_key_id=M\naws_secret_access_key=MS\naws_session_token=T\n\
            [half]\naws_access_key_id = H\n";
        let path = file(&dir, "credentials", text, 0o600);
        let d = read_shared_file(&path, "default").unwrap();
        assert_eq!((d.access_key.as_str(), d.secret_key.as_str()), ("D", "DS"));
        assert_eq!(d.session_token, None);
        let m = read_shared_file(&path, "media").unwrap();
        assert_eq!(
            (m.access_key.as_str(), m.session_token.as_deref()),
            ("M", Some("T"))
        );
        assert!(m.source.ends_with("[media]"), "{}", m.source);
        for profile in ["half", "nobody"] {
            let e = read_shared_file(&path, profile).unwrap_err();
            assert!(e.contains(&format!("in profile [{profile}]")), "{e}");
        }
        let open = file(&dir, "open", text, 0o604);
        assert!(read_shared_file(&open, "default")
            .unwrap_err()
            .contains("chmod 600"));
    }

    #[test]
    fn the_sse_c_key_is_32_bytes_raw_or_in_base64() {
        let dir = tempfile::tempdir().unwrap();
        let raw: Vec<u8> = (0..32).collect();
        assert_eq!(
            read_customer_key(&file(&dir, "raw", &raw, 0o600))
                .unwrap()
                .to_vec(),
            raw
        );
        // The same 32 bytes in base64, with a newline as `base64` writes it.
        let b64 = b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n";
        assert_eq!(
            read_customer_key(&file(&dir, "b64", b64, 0o400))
                .unwrap()
                .to_vec(),
            raw
        );
        let cases: &[(&[u8], u32, &str)] = &[
            (&raw, 0o644, "chmod 600"),
            (&raw[..31], 0o600, "does not hold a 32-byte key"),
            (
                b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHg==",
                0o600,
                "does not hold a 32-byte key",
            ),
            (b"not base64 at all!", 0o600, "does not hold a 32-byte key"),
        ];
        for (i, (text, mode, expect)) in cases.iter().enumerate() {
            let e = read_customer_key(&file(&dir, &format!("bad{i}"), text, *mode)).unwrap_err();
            assert!(e.contains(expect), "case {i}: {e}");
        }
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let c = Credentials {
            access_key: "AKID".into(),
            secret_key: "very-secret".into(),
            session_token: Some("token-secret".into()),
            source: "test".into(),
        };
        let shown = format!("{c:?}");
        assert!(
            shown.contains("AKID") && !shown.contains("secret"),
            "{shown}"
        );
    }
}
