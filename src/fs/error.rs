//! The error type of filesystem operations: the errno the caller sees, a sentence saying what
//! was being done, and the failure underneath (the store's, or the local disk's). An error is
//! made where the failure happens and logged once, where it leaves for the kernel
//! (`fuse.rs`); an answer such as "no such file" carries no failure and is not logged.

use std::borrow::Cow;
use std::sync::Arc;

use crate::store::StoreError;

#[derive(Debug, Clone)]
pub struct FsError {
    errno: i32,
    /// What was being done, e.g. "GET of media/ab/cd".
    context: Option<Cow<'static, str>>,
    source: Option<Source>,
}

/// The failure an error comes from.
#[derive(Debug, Clone)]
enum Source {
    Store(StoreError),
    Local(Arc<std::io::Error>),
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub const NOENT: FsError = FsError::answer(libc::ENOENT);
    pub const EXIST: FsError = FsError::answer(libc::EEXIST);
    pub const NOTDIR: FsError = FsError::answer(libc::ENOTDIR);
    pub const ISDIR: FsError = FsError::answer(libc::EISDIR);
    pub const NOTEMPTY: FsError = FsError::answer(libc::ENOTEMPTY);
    pub const NAMETOOLONG: FsError = FsError::answer(libc::ENAMETOOLONG);
    pub const INVAL: FsError = FsError::answer(libc::EINVAL);
    pub const IO: FsError = FsError::answer(libc::EIO);
    pub const BADF: FsError = FsError::answer(libc::EBADF);
    pub const XDEV: FsError = FsError::answer(libc::EXDEV);
    pub const NOTTY: FsError = FsError::answer(libc::ENOTTY);
    pub const FBIG: FsError = FsError::answer(libc::EFBIG);
    pub const NOSPC: FsError = FsError::answer(libc::ENOSPC);

    /// An errno alone: what the caller asked for is not possible, and nothing failed.
    const fn answer(errno: i32) -> FsError {
        FsError {
            errno,
            context: None,
            source: None,
        }
    }

    /// `errno`, because of what `context` says (a failure worth a log line).
    pub fn new(errno: i32, context: impl Into<Cow<'static, str>>) -> FsError {
        FsError {
            errno,
            context: Some(context.into()),
            source: None,
        }
    }

    /// A request to the store failed: `op` (`GET`, `LIST`...) of `key`.
    /// A missing object is an answer, not a failure.
    pub fn store(op: &str, key: &str, e: StoreError) -> FsError {
        match e {
            StoreError::NotFound => FsError::NOENT,
            e => FsError::from(e).context(format!("{op} of {key}")),
        }
    }

    /// Says what was being done.
    pub fn context(mut self, context: impl Into<Cow<'static, str>>) -> FsError {
        self.context = Some(context.into());
        self
    }

    pub fn errno(&self) -> i32 {
        self.errno
    }

    pub fn is(&self, errno: i32) -> bool {
        self.errno == errno
    }

    /// Whether something failed (the store, the disk, a check), as opposed to an answer
    /// like ENOENT or EEXIST: failures are logged.
    pub fn is_failure(&self) -> bool {
        self.context.is_some() || self.source.is_some()
    }

    /// What to log and rate-limit by: the context, else the failure.
    pub fn what(&self) -> Cow<'_, str> {
        match (&self.context, &self.source) {
            (Some(c), _) => Cow::Borrowed(c),
            (None, Some(s)) => Cow::Owned(s.to_string()),
            (None, None) => Cow::Borrowed(""),
        }
    }
}

/// The errno a store failure shows to callers.
fn store_errno(e: &StoreError) -> i32 {
    match e {
        StoreError::NotFound | StoreError::NoSuchBucket(_) => libc::ENOENT,
        StoreError::AccessDenied(_) | StoreError::BadCredentials(_) => libc::EACCES,
        _ => libc::EIO,
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        FsError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            context: None,
            source: Some(Source::Local(Arc::new(e))),
        }
    }
}

impl From<StoreError> for FsError {
    fn from(e: StoreError) -> Self {
        FsError {
            errno: store_errno(&e),
            context: None,
            // Not found is an answer: nothing failed.
            source: (e != StoreError::NotFound).then_some(Source::Store(e)),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Store(e) => write!(f, "the store: {e}"),
            Source::Local(e) => write!(f, "the cache directory: {e}"),
        }
    }
}

impl std::fmt::Display for FsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(c) = &self.context {
            write!(f, "{c}: ")?;
        }
        if let Some(s) = &self.source {
            write!(f, "{s}: ")?;
        }
        write!(f, "{}", std::io::Error::from_raw_os_error(self.errno))
    }
}

impl std::error::Error for FsError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_says_what_was_done_what_failed_and_what_the_caller_sees() {
        let e = FsError::store(
            "GET",
            "media/ab",
            StoreError::Unreachable("connection refused".into()),
        );
        assert_eq!(e.errno(), libc::EIO);
        assert!(e.is_failure());
        let text = e.to_string();
        assert!(
            text.starts_with(
                "GET of media/ab: the store: cannot reach the endpoint: connection refused"
            ),
            "{text}"
        );
        assert!(text.contains("Input/output error"), "{text}");
        let denied = FsError::from(StoreError::AccessDenied("no".into()));
        assert_eq!(denied.errno(), libc::EACCES);
    }

    #[test]
    fn each_kind_of_store_failure_has_its_errno() {
        let s = || String::from("x");
        let cases = [
            (StoreError::NotFound, libc::ENOENT),
            (StoreError::NoSuchBucket(s()), libc::ENOENT),
            (StoreError::AccessDenied(s()), libc::EACCES),
            (StoreError::BadCredentials(s()), libc::EACCES),
            // Not EOPNOTSUPP: callers read that from fsync as "nothing to sync here".
            (
                StoreError::NotImplemented {
                    op: "PutObject",
                    message: s(),
                },
                libc::EIO,
            ),
            (StoreError::WrongRegion(s()), libc::EIO),
            (StoreError::Unreachable(s()), libc::EIO),
            (StoreError::BrokenOff(s()), libc::EIO),
            (StoreError::Damaged(s()), libc::EIO),
            (StoreError::Protocol(s()), libc::EIO),
            (StoreError::Service(s()), libc::EIO),
            (StoreError::Local(s()), libc::EIO),
            (StoreError::ShuttingDown, libc::EIO),
            (StoreError::PreconditionFailed, libc::EIO),
        ];
        for (e, errno) in cases {
            assert_eq!(FsError::from(e.clone()).errno(), errno, "{e:?}");
        }
    }

    #[test]
    fn answers_are_not_failures() {
        assert!(!FsError::NOENT.is_failure());
        let gone = FsError::store("HEAD", "k", StoreError::NotFound);
        assert!(gone.is(libc::ENOENT) && !gone.is_failure());
        assert!(!FsError::from(StoreError::NotFound).is_failure());
        let full = FsError::from(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(full.is(libc::ENOSPC) && full.is_failure());
    }
}
