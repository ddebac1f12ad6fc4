//! A problem found in a config, connector or pipeline file, with its exact place.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem: `file:line:col: path: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based; 0 when the place is the whole file.
    pub line: usize,
    /// 1-based; 0 when the place is the whole file.
    pub col: usize,
    /// Dotted path inside the document (`sources.shop.secret`), empty for the document itself.
    pub path: String,
    pub message: String,
}

impl Diagnostic {
    pub fn new(
        file: &Path,
        line: usize,
        col: usize,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            file: file.to_path_buf(),
            line,
            col,
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.col)?;
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

/// Every problem found, in file order. Displayed one per line.
#[derive(Debug, Default, Clone)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn extend(&mut self, other: Diagnostics) {
        self.0.extend(other.0);
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// The closest candidate to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::jaro_winkler(&word.to_ascii_lowercase(), &c.to_ascii_lowercase()),
                c,
            )
        })
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// ` (did you mean `x`?)` for the closest candidate to `word`, or nothing.
pub fn suggestion<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    did_you_mean(word, candidates)
        .map(|s| format!(" (did you mean `{s}`?)"))
        .unwrap_or_default()
}

/// `a, b, c`, or `empty` when there are none (the known names an error lists).
pub fn listed(names: &[&str], empty: &str) -> String {
    if names.is_empty() {
        empty.to_string()
    } else {
        names.join(", ")
    }
}

/// Adds ` (did you mean `x`?)` to serde's "unknown field/variant `a`, expected one of `b`, `c`".
pub fn with_suggestion(message: &str) -> String {
    let is_unknown = message.starts_with("unknown field") || message.starts_with("unknown variant");
    if !is_unknown {
        return message.to_string();
    }
    let quoted: Vec<&str> = message.split('`').skip(1).step_by(2).collect();
    match quoted.split_first() {
        Some((word, rest)) => match did_you_mean(word, rest.iter().copied()) {
            Some(s) => format!("{message} (did you mean `{s}`?)"),
            None => message.to_string(),
        },
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_file_line_col_path_message() {
        let d = Diagnostic::new(Path::new("perkflow.yaml"), 7, 5, "sources.shop", "boom");
        assert_eq!(d.to_string(), "perkflow.yaml:7:5: sources.shop: boom");
        let d = Diagnostic::new(Path::new("a.yaml"), 0, 0, "", "cannot read");
        assert_eq!(d.to_string(), "a.yaml: cannot read");
    }

    #[test]
    fn suggests_closest_known_name() {
        assert_eq!(
            with_suggestion("unknown field `secert`, expected one of `connector`, `secret`, `secrets`"),
            "unknown field `secert`, expected one of `connector`, `secret`, `secrets` (did you mean `secret`?)"
        );
        assert_eq!(
            did_you_mean("shopfy", ["stripe", "shopify", "square"]),
            Some("shopify")
        );
        assert_eq!(did_you_mean("zzz", ["stripe", "shopify"]), None);
        assert_eq!(
            with_suggestion("invalid type: string"),
            "invalid type: string"
        );
    }
}
