//! One error type for the whole crate. Every message says which file, node, tensor,
//! stage or recipe key it is about; `context` wraps an error with where it happened.

use std::fmt;
use std::path::Path;

/// What class of failure an error is; decides the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad command line or bad recipe: exit code 2.
    Usage,
    /// Anything that failed while doing the work: exit code 1.
    Failure,
}

#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    context: Vec<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn msg(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Failure,
            message: message.into(),
            context: Vec::new(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Usage,
            message: message.into(),
            context: Vec::new(),
        }
    }

    /// An error about a file's contents: `path: message`.
    pub fn file(path: &Path, message: impl fmt::Display) -> Self {
        let path = crate::pipeline::fsutil::shorten(&path.display().to_string());
        Error::msg(format!("{path}: {message}"))
    }

    pub fn io(path: &Path, err: std::io::Error) -> Self {
        let path = crate::pipeline::fsutil::shorten(&path.display().to_string());
        Error::msg(format!("{path}: {err}"))
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
    }

    /// The innermost message, without context lines.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Wraps the error with where it happened. A context the error already starts
    /// with (a node or stage the message names first) is not repeated.
    pub fn context(mut self, ctx: impl Into<String>) -> Self {
        let ctx = ctx.into();
        let head = self.context.last().unwrap_or(&self.message);
        let named = head
            .strip_prefix(ctx.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(": "));
        if !named {
            self.context.push(ctx);
        }
        self
    }

    pub fn exit_code(&self) -> i32 {
        match self.kind {
            ErrorKind::Usage => 2,
            ErrorKind::Failure => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for ctx in self.context.iter().rev() {
            write!(f, "{ctx}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<crate::ir::IrError> for Error {
    fn from(e: crate::ir::IrError) -> Self {
        Error::msg(e.to_string())
    }
}

/// Adds context to any result whose error converts into [`Error`].
pub trait ResultExt<T> {
    fn context(self, ctx: impl Into<String>) -> Result<T>;
    fn with_context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, ctx: impl Into<String>) -> Result<T> {
        self.map_err(|e| e.into().context(ctx))
    }
    fn with_context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| e.into().context(f()))
    }
}

/// Reads a whole file, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::msg(format!($($arg)*))) };
}
