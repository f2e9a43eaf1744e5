//! Where in a job file a value was written: turns a value's span into "file:line: key `k`: …"
//! errors. The leaf of job parsing: every other job module uses it, it uses none of them.

use crate::error::Error;
use std::path::Path;
use toml::Spanned;

/// Builds "file:line: key `k`: message" errors from spans.
pub(super) struct Locator<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
}

impl Locator<'_> {
    /// The line a value starts on.
    pub(super) fn line<T>(&self, span: &Spanned<T>) -> usize {
        self.text[..span.span().start.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    pub(super) fn err<T>(
        &self,
        key: &str,
        span: &Spanned<T>,
        msg: impl std::fmt::Display,
    ) -> Error {
        Error::Usage(format!(
            "invalid job file {}:{}: key `{key}`: {msg}",
            self.path.display(),
            self.line(span)
        ))
    }
}
