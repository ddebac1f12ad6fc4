//! `${ENV_VAR}` and `${file:/path}` interpolation, and the `Secret` newtype that never prints.
//!
//! Parsing only checks the syntax, so `perkflow check` needs no secret values; values are
//! read in `resolve`, when the daemon builds its runtime.

use serde::de::{self, Deserialize, Deserializer, Visitor};
use std::fmt;
use std::path::Path;

/// A config string that may reference environment variables and files.
#[derive(Clone, PartialEq, Eq)]
pub struct Interpolated {
    parts: Vec<Part>,
}

#[derive(Clone, PartialEq, Eq, Debug)]
enum Part {
    Text(String),
    Env(String),
    File(String),
}

/// A resolved secret. `Debug` and `Display` print `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Interpolated {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = super::yaml::restore(s);
        let mut parts = Vec::new();
        let mut rest = &*s;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| "unterminated `${`: expected `}`".to_string())?;
            let inner = after[..end].trim();
            if let Some(path) = inner.strip_prefix("file:") {
                if path.trim().is_empty() {
                    return Err("`${file:}` needs a path".into());
                }
                parts.push(Part::File(path.trim().to_string()));
            } else {
                let valid = !inner.is_empty()
                    && inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !inner.starts_with(|c: char| c.is_ascii_digit());
                if !valid {
                    return Err(format!(
                        "`${{{inner}}}` is not a valid reference: use `${{ENV_VAR}}` or `${{file:/path}}`"
                    ));
                }
                parts.push(Part::Env(inner.to_string()));
            }
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Interpolated { parts })
    }

    /// A literal value (no references).
    pub fn literal(s: &str) -> Self {
        Interpolated {
            parts: vec![Part::Text(s.to_string())],
        }
    }

    /// Whether the value is written in the file itself (no references).
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// The value as written, references included (`${TWILIO_ACCOUNT_SID}`): what a dry run
    /// shows for a value it cannot read.
    pub fn as_written(&self) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.clone(),
                Part::Env(n) => format!("${{{n}}}"),
                Part::File(p) => format!("${{file:{p}}}"),
            })
            .collect()
    }

    /// Reads the referenced variables and files. `base` resolves relative file paths.
    /// Errors name the variable or file, never a value.
    pub fn resolve(&self, base: &Path) -> Result<Secret, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Env(name) => match std::env::var(name) {
                    Ok(v) => out.push_str(&v),
                    Err(std::env::VarError::NotPresent) => {
                        return Err(format!("environment variable {name} is not set"))
                    }
                    Err(std::env::VarError::NotUnicode(_)) => {
                        return Err(format!("environment variable {name} is not valid UTF-8"))
                    }
                },
                Part::File(path) => {
                    let full = base.join(path);
                    let text = std::fs::read_to_string(&full)
                        .map_err(|e| format!("cannot read secret file {}: {e}", full.display()))?;
                    // A trailing newline in a secret file is an editor's, not the secret's.
                    out.push_str(
                        text.strip_suffix('\n')
                            .map(|t| t.strip_suffix('\r').unwrap_or(t))
                            .unwrap_or(&text),
                    );
                }
            }
        }
        Ok(Secret(out))
    }
}

impl fmt::Debug for Interpolated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Literal text may be a secret written inline: show only the references.
        let shown: Vec<String> = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Text(_) => "[text]".to_string(),
                Part::Env(n) => format!("${{{n}}}"),
                Part::File(p) => format!("${{file:{p}}}"),
            })
            .collect();
        write!(f, "Interpolated({})", shown.join(""))
    }
}

impl<'de> Deserialize<'de> for Interpolated {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Interpolated;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, `${ENV_VAR}` or `${file:/path}`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Interpolated, E> {
                Interpolated::parse(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Interpolated, E> {
                Ok(Interpolated::literal(&v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Interpolated, E> {
                Ok(Interpolated::literal(&v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves_env_and_file_references() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key.txt"), "s3cret\n").unwrap();
        std::env::set_var("PERKFLOW_TEST_SECRET_A", "abc");
        let v = Interpolated::parse("x-${PERKFLOW_TEST_SECRET_A}-${file:key.txt}").unwrap();
        assert_eq!(v.resolve(dir.path()).unwrap().expose(), "x-abc-s3cret");
        assert!(!v.is_literal());
    }

    #[test]
    fn missing_variable_names_it_and_not_a_value() {
        let v = Interpolated::parse("${PERKFLOW_TEST_UNSET_VAR}").unwrap();
        let e = v.resolve(Path::new(".")).unwrap_err();
        assert_eq!(e, "environment variable PERKFLOW_TEST_UNSET_VAR is not set");
    }

    #[test]
    fn shows_a_value_as_written() {
        let v = Interpolated::parse("Basic ${PERKFLOW_TEST_UNSET_VAR}${file: key.txt}").unwrap();
        assert_eq!(
            v.as_written(),
            "Basic ${PERKFLOW_TEST_UNSET_VAR}${file:key.txt}"
        );
    }

    #[test]
    fn rejects_bad_references() {
        assert!(Interpolated::parse("${UNCLOSED")
            .unwrap_err()
            .contains("unterminated"));
        assert!(Interpolated::parse("${}").is_err());
        assert!(Interpolated::parse("${file:}").is_err());
        assert!(Interpolated::parse("${A-B}").is_err());
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        let i = Interpolated::parse("inline-secret").unwrap();
        assert!(!format!("{i:?}").contains("inline"));
    }
}
