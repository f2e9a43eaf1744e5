//! Where in a TOML file (a job file, a fleet file) a value was written: parses the file into
//! its raw, spanned form and turns a value's span into "invalid KIND FILE:LINE: key `k`: …"
//! errors. The leaf of job and fleet parsing: it uses no other module of either.

use crate::error::Error;
use serde::de::DeserializeOwned;
use std::path::Path;
use toml::Spanned;

/// Builds "invalid KIND FILE:LINE: key `k`: message" errors from spans.
pub(crate) struct Locator<'a> {
    /// What the file is, for messages: "job file", "fleet file".
    pub(crate) kind: &'static str,
    pub(crate) path: &'a Path,
    pub(crate) text: &'a str,
}

impl Locator<'_> {
    /// The line a value starts on.
    pub(crate) fn line<T>(&self, span: &Spanned<T>) -> usize {
        self.line_at(span.span().start)
    }

    fn line_at(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    pub(crate) fn err<T>(
        &self,
        key: &str,
        span: &Spanned<T>,
        msg: impl std::fmt::Display,
    ) -> Error {
        Error::Usage(format!(
            "invalid {} {}:{}: key `{key}`: {msg}",
            self.kind,
            self.path.display(),
            self.line(span)
        ))
    }

    /// The file as written, or an error naming the file, the line and (for a wrong type) the
    /// key.
    pub(crate) fn parse<T: DeserializeOwned>(&self) -> Result<T, Error> {
        let (kind, path, text) = (self.kind, self.path.display(), self.text);
        toml::from_str(text).map_err(|e| {
            let msg = e.message().trim_end().to_string();
            let Some(span) = e.span() else {
                return Error::Usage(format!("invalid {kind} {path}: {msg}"));
            };
            let start = span.start.min(text.len());
            let line = self.line_at(start);
            // Type errors point at the value; name the key written before it on that line.
            let line_start = text[..start].rfind('\n').map(|i| i + 1).unwrap_or(0);
            let key = text[line_start..start]
                .split_once('=')
                .map(|(k, _)| k.trim().trim_matches('"'))
                // Only a bare key: never text from inside a value (a URL may hold a password).
                .filter(|k| {
                    !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
                        && !msg.contains(&format!("`{k}`"))
                });
            match key {
                Some(k) => Error::Usage(format!("invalid {kind} {path}:{line}: key `{k}`: {msg}")),
                None => Error::Usage(format!("invalid {kind} {path}:{line}: {msg}")),
            }
        })
    }
}
