//! The only importer of `serde_yaml`: typed parsing with exact `line:col` errors.
//!
//! serde stops at the first error of a document. To report every problem of a file, the
//! entries of a map (each source, each sink) are parsed one by one: a marked YAML event
//! parser finds where each entry's value starts and ends, and that slice is parsed by
//! serde_yaml at its original line and column, so its errors point into the real file.
//! The same index gives `line:col` to problems found later, by path.

use super::diagnostic::{with_suggestion, Diagnostic};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::path::Path;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Where each node of a document is: path -> (line, col) of its value, and its byte span.
#[derive(Debug, Default)]
pub struct Locations {
    values: HashMap<String, Place>,
    keys: HashMap<String, Place>,
}

#[derive(Debug, Clone, Copy)]
struct Place {
    line: usize,
    col: usize,
    start: usize,
    end: usize,
}

impl Locations {
    /// `(line, col)` of the value at `path`, or of the nearest parent that exists.
    pub fn value(&self, path: &str) -> (usize, usize) {
        self.find(&self.values, path)
    }
    /// Whether a value exists at exactly `path`.
    pub fn has(&self, path: &str) -> bool {
        self.values.contains_key(path)
    }

    /// `(line, col)` of the key at `path` (falls back to its value, then its parent).
    pub fn key(&self, path: &str) -> (usize, usize) {
        match self.keys.get(path) {
            Some(p) => (p.line, p.col),
            None => self.value(path),
        }
    }
    fn find(&self, map: &HashMap<String, Place>, path: &str) -> (usize, usize) {
        let mut p = path;
        loop {
            if let Some(place) = map.get(p) {
                return (place.line, place.col);
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return map.get("").map(|pl| (pl.line, pl.col)).unwrap_or((1, 1)),
            }
        }
    }
}

/// Joins a map key onto a path.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

struct Indexer {
    chars_to_bytes: Vec<usize>,
    stack: Vec<Frame>,
    loc: Locations,
    /// Nodes that ended; their span ends where the next event starts.
    open_ends: Vec<String>,
    /// A block collection just opened: the parser marks it where it recognised it (after its
    /// first key), so its start moves back to its first child's.
    fresh_container: Option<String>,
}

impl Indexer {
    fn byte(&self, m: &Marker) -> usize {
        *self
            .chars_to_bytes
            .get(m.index())
            .unwrap_or(self.chars_to_bytes.last().unwrap_or(&0))
    }

    /// The path of a node starting now, or None when it is a mapping key.
    fn node_path(&mut self, ev: &Event, m: &Marker) -> Option<String> {
        let here = self.byte(m);
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                Some(p)
            }
            Some(Frame::Map { path, key }) => match key.take() {
                Some(k) => Some(join(path, &k)),
                None => {
                    let name = match ev {
                        Event::Scalar(s, ..) => s.clone(),
                        _ => "?".to_string(),
                    };
                    let full = join(path, &name);
                    *key = Some(name);
                    let place = Place {
                        line: m.line(),
                        col: m.col() + 1,
                        start: here,
                        end: here,
                    };
                    self.loc.keys.insert(full, place);
                    None
                }
            },
        }
    }
}

impl MarkedEventReceiver for Indexer {
    fn on_event(&mut self, ev: Event, m: Marker) {
        let here = self.byte(&m);
        for p in self.open_ends.drain(..) {
            if let Some(place) = self.loc.values.get_mut(&p) {
                place.end = here;
            }
        }
        match ev {
            Event::Scalar(..)
            | Event::Alias(_)
            | Event::MappingStart(..)
            | Event::SequenceStart(..) => {
                if let Some(parent) = self.fresh_container.take() {
                    if let Some(p) = self.loc.values.get_mut(&parent) {
                        if here < p.start {
                            *p = Place {
                                line: m.line(),
                                col: m.col() + 1,
                                start: here,
                                end: here,
                            };
                        }
                    }
                }
                let Some(path) = self.node_path(&ev, &m) else {
                    return;
                };
                let place = Place {
                    line: m.line(),
                    col: m.col() + 1,
                    start: here,
                    end: here,
                };
                self.loc.values.insert(path.clone(), place);
                match ev {
                    Event::MappingStart(..) => {
                        self.fresh_container = Some(path.clone());
                        self.stack.push(Frame::Map { path, key: None })
                    }
                    Event::SequenceStart(..) => {
                        self.fresh_container = Some(path.clone());
                        self.stack.push(Frame::Seq { path, index: 0 })
                    }
                    _ => self.open_ends.push(path),
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                if let Some(Frame::Map { path, .. } | Frame::Seq { path, .. }) = self.stack.pop() {
                    self.open_ends.push(path);
                }
            }
            _ => {}
        }
    }
}

/// Stand-ins for `{` and `}` of `${…}` references while YAML is parsed: `${X}` is not a valid
/// plain scalar inside a flow mapping (`{ secret: ${X} }`), yet that is how people write it.
/// The stand-ins keep every line and column; `restore` puts the braces back.
const OPEN: char = '\u{E000}';
const CLOSE: char = '\u{E001}';

fn protect(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        let line_end = rest[i..].find('\n').map(|n| i + n).unwrap_or(rest.len());
        match rest[i + 2..line_end].find('}') {
            Some(j) => {
                out.push_str(&rest[..i + 1]);
                out.push(OPEN);
                out.push_str(&rest[i + 2..i + 2 + j]);
                out.push(CLOSE);
                rest = &rest[i + 2 + j + 1..];
            }
            None => {
                out.push_str(&rest[..i + 2]);
                rest = &rest[i + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Undoes `protect` in a parsed string.
pub fn restore(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([OPEN, CLOSE]) {
        s.replace(OPEN, "{").replace(CLOSE, "}").into()
    } else {
        s.into()
    }
}

/// A parsed document: its text, locations, and the file it came from.
pub struct Document<'a> {
    pub file: &'a Path,
    text: String,
    pub loc: Locations,
}

impl<'a> Document<'a> {
    /// Indexes a YAML text. A syntax error is returned as a diagnostic.
    pub fn index(file: &'a Path, text: &str) -> Result<Self, Diagnostic> {
        let text = protect(text);
        let mut chars_to_bytes: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        chars_to_bytes.push(text.len());
        let mut ix = Indexer {
            chars_to_bytes,
            stack: Vec::new(),
            loc: Locations::default(),
            open_ends: Vec::new(),
            fresh_container: None,
        };
        let mut parser = Parser::new_from_str(&text);
        if let Err(e) = parser.load(&mut ix, false) {
            let m = e.marker();
            return Err(Diagnostic::new(
                file,
                m.line(),
                m.col() + 1,
                "",
                format!("invalid YAML: {}", restore(e.info())),
            ));
        }
        Ok(Document {
            file,
            text,
            loc: ix.loc,
        })
    }

    /// Parses the whole document into `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, Diagnostic> {
        if self.text.trim().is_empty() {
            return serde_yaml::from_str::<T>("{}").map_err(|e| self.diag("", e));
        }
        serde_yaml::from_str(&self.text).map_err(|e| self.diag("", e))
    }

    /// Parses the value at `path` alone, keeping its place in the file for errors.
    pub fn parse_at<T: DeserializeOwned>(&self, path: &str) -> Result<T, Diagnostic> {
        let Some(place) = self.loc.values.get(path) else {
            return Err(Diagnostic::new(self.file, 1, 1, path, "missing"));
        };
        let mut slice = &self.text[place.start..place.end.max(place.start)];
        // The span runs up to where the parser noticed the next node, which in block style is
        // on a later line (possibly after its `- ` or key): the last partial line is not ours.
        if let Some(nl) = slice.rfind('\n') {
            slice = &slice[..nl];
        }
        let mut sub = "\n".repeat(place.line.saturating_sub(1));
        sub.push_str(&" ".repeat(place.col.saturating_sub(1)));
        sub.push_str(slice);
        serde_yaml::from_str(&sub).map_err(|e| self.diag(path, e))
    }

    /// Parses the block-mapping entry `key: value` at `path` alone, as a mapping of that one
    /// entry, keeping its place in the file for errors. Lets a struct's fields be checked one
    /// by one, so one bad field does not hide the problems of the others.
    pub fn parse_entry<T: DeserializeOwned>(&self, path: &str) -> Result<T, Diagnostic> {
        let (Some(key), Some(value)) = (self.loc.keys.get(path), self.loc.values.get(path)) else {
            return Err(Diagnostic::new(self.file, 1, 1, path, "missing"));
        };
        let slice = &self.text[key.start..value.end.max(key.start)];
        let mut sub = "\n".repeat(key.line.saturating_sub(1));
        sub.push_str(&" ".repeat(key.col.saturating_sub(1)));
        sub.push_str(slice);
        let parent = path.rfind('.').map(|i| &path[..i]).unwrap_or("");
        serde_yaml::from_str(&sub).map_err(|e| self.diag(parent, e))
    }

    /// The keys of the mapping at `path`, in file order.
    pub fn keys_of(&self, path: &str) -> Vec<String> {
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}.")
        };
        let mut keys: Vec<(usize, String)> = self
            .loc
            .keys
            .iter()
            .filter_map(|(k, place)| {
                let rest = k.strip_prefix(&prefix)?;
                (!rest.contains(['.', '[']))
                    .then(|| (place.line * 100_000 + place.col, rest.to_string()))
            })
            .collect();
        keys.sort();
        keys.into_iter().map(|(_, k)| k).collect()
    }

    /// A diagnostic at the value of `path`.
    pub fn at(&self, path: &str, message: impl Into<String>) -> Diagnostic {
        let (line, col) = self.loc.value(path);
        Diagnostic::new(self.file, line, col, path, restore(&message.into()))
    }

    /// A diagnostic at the key of `path`.
    pub fn at_key(&self, path: &str, message: impl Into<String>) -> Diagnostic {
        let (line, col) = self.loc.key(path);
        Diagnostic::new(self.file, line, col, path, restore(&message.into()))
    }

    fn diag(&self, base: &str, e: serde_yaml::Error) -> Diagnostic {
        let text = e.to_string();
        // serde_yaml writes "<path>: <message> at line L column C".
        let text = match text.rfind(" at line ") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        let (inner, message) = match text.split_once(": ") {
            Some((p, m)) if !p.contains(' ') && !p.is_empty() => {
                (p.trim_start_matches('.').to_string(), m.to_string())
            }
            _ => (String::new(), text.clone()),
        };
        let path = match (base.is_empty(), inner.is_empty()) {
            (_, true) => base.to_string(),
            (true, false) => inner,
            (false, false) if inner.starts_with('[') => format!("{base}{inner}"),
            (false, false) => format!("{base}.{inner}"),
        };
        // An unknown field is a problem of that key: name it in the path, as line:col does.
        let path = match message
            .strip_prefix("unknown field `")
            .and_then(|r| r.split_once('`'))
        {
            Some((field, _)) => join(&path, field),
            None => path,
        };
        let (line, col) = match e.location() {
            Some(l) => (l.line(), l.column()),
            None => self.loc.value(base),
        };
        Diagnostic::new(
            self.file,
            line,
            col,
            path,
            with_suggestion(&restore(&message)),
        )
    }
}

/// A flat `name: value` YAML map (fixture headers), in file order.
pub fn string_map(text: &str) -> Result<indexmap::IndexMap<String, String>, String> {
    if text.trim().is_empty() {
        return Ok(Default::default());
    }
    serde_yaml::from_str(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        #[allow(dead_code)]
        connector: String,
        #[allow(dead_code)]
        secret: Option<String>,
    }

    const TEXT: &str = "listen: 127.0.0.1:1\nsources:\n  a:\n    connector: shopify\n    secert: x\n  b: { connector: stripe, secret: y }\n  c:\n    connector: [1]\n";

    #[test]
    fn indexes_values_and_keys() {
        let doc = Document::index(Path::new("f.yaml"), TEXT).unwrap();
        assert_eq!(doc.loc.value("sources.a.connector"), (4, 16));
        assert_eq!(doc.loc.key("sources.a.secert"), (5, 5));
        assert_eq!(doc.loc.value("sources.b.secret"), (6, 35));
        assert_eq!(doc.keys_of("sources"), vec!["a", "b", "c"]);
    }

    #[test]
    fn parses_each_entry_with_its_real_position() {
        let doc = Document::index(Path::new("f.yaml"), TEXT).unwrap();
        let a = doc.parse_at::<Entry>("sources.a").unwrap_err();
        assert_eq!(
            a.to_string(),
            "f.yaml:5:5: sources.a.secert: unknown field `secert`, expected `connector` or `secret` (did you mean `secret`?)"
        );
        assert!(doc.parse_at::<Entry>("sources.b").is_ok());
        let c = doc.parse_at::<Entry>("sources.c").unwrap_err();
        assert_eq!(c.line, 8);
        assert_eq!(c.path, "sources.c.connector");
    }

    #[test]
    fn references_in_flow_mappings_parse_and_keep_columns() {
        let text = "s: { a: ${X_Y}, b: 2 }\nt: \"${Z}\"\n";
        let doc = Document::index(Path::new("f.yaml"), text).unwrap();
        assert_eq!(doc.loc.value("s.b"), (1, 20));
        #[derive(Deserialize)]
        struct S {
            a: String,
        }
        let s: S = doc
            .parse_at("s")
            .map_err(|d| d.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(restore(&s.a), "${X_Y}");
        assert_eq!(protect("a: ${unclosed\n"), "a: ${unclosed\n");
    }

    #[test]
    fn sequence_items_parse_alone() {
        let text = "steps:\n  - when: \"x\"\n  - set:\n      a: b\n  - { deliver: 1 }\n";
        let doc = Document::index(Path::new("f"), text).unwrap();
        let v: serde_yaml::Value = doc.parse_at("steps[0]").unwrap();
        assert_eq!(v["when"], "x");
        let v: serde_yaml::Value = doc.parse_at("steps[1]").unwrap();
        assert_eq!(v["set"]["a"], "b");
        let v: serde_yaml::Value = doc.parse_at("steps[2]").unwrap();
        assert_eq!(v["deliver"], 1);
    }

    #[test]
    fn reports_yaml_syntax_errors_with_position() {
        let e = Document::index(Path::new("f.yaml"), "a: [1, 2\nb: 3\n")
            .err()
            .unwrap();
        assert!(e.to_string().starts_with("f.yaml:"), "{e}");
        assert!(e.message.starts_with("invalid YAML"));
    }
}
