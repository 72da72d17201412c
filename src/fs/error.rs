//! The error type of filesystem operations: an errno, which is all a caller can see.

use crate::store::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsError(pub i32);

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub const NOENT: FsError = FsError(libc::ENOENT);
    pub const EXIST: FsError = FsError(libc::EEXIST);
    pub const NOTDIR: FsError = FsError(libc::ENOTDIR);
    pub const ISDIR: FsError = FsError(libc::EISDIR);
    pub const NOTEMPTY: FsError = FsError(libc::ENOTEMPTY);
    pub const NAMETOOLONG: FsError = FsError(libc::ENAMETOOLONG);
    pub const INVAL: FsError = FsError(libc::EINVAL);
    pub const IO: FsError = FsError(libc::EIO);
    pub const BADF: FsError = FsError(libc::EBADF);
    pub const XDEV: FsError = FsError(libc::EXDEV);
    pub const NOTTY: FsError = FsError(libc::ENOTTY);
    pub const FBIG: FsError = FsError(libc::EFBIG);
    pub const NOSPC: FsError = FsError(libc::ENOSPC);
    /// The store is unreachable; used inside the filesystem layer, never returned to callers.
    pub(crate) const OFFLINE: FsError = FsError(libc::EHOSTUNREACH);

    pub fn errno(self) -> i32 {
        self.0
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        FsError(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl From<StoreError> for FsError {
    fn from(e: StoreError) -> Self {
        FsError(e.errno())
    }
}

impl std::fmt::Display for FsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}
