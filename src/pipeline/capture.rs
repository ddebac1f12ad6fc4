//! Statements that capture output are not available in fields.
//!
//! A field's output is refused past 1 MiB as it is written (`expr::Capped`), but minijinja
//! writes what `{% set x %}…{% endset %}`, `{% filter %}`, a macro or a `{% call %}` body
//! produces into buffers of its own, which that limit never sees: a loop inside one could
//! build gigabytes within the fuel limit (a loop count and a string taken from a payload
//! would let a sender do it). Pipelines compute values and short messages; they do not need
//! them, so a field that uses one is refused when it is compiled.

use minijinja::machinery::ast::Stmt;

/// An error naming the first capturing statement of the template `src`, if it has one. A
/// source that does not parse passes: compiling it reports the error.
pub fn refuse(src: &str) -> Result<(), String> {
    if !src.contains("{%") {
        return Ok(());
    }
    let Ok(stmt) = minijinja::machinery::parse(src, "<template>", Default::default()) else {
        return Ok(());
    };
    match first_capture(&stmt) {
        Some(what) => Err(format!(
            "`{what}` is not available in perkflow fields: the output it captures escapes the 1 MiB limit on a field's value"
        )),
        None => Ok(()),
    }
}

fn first_capture(s: &Stmt) -> Option<&'static str> {
    let body = |b: &[Stmt]| b.iter().find_map(first_capture);
    match s {
        Stmt::SetBlock(_) => Some("{% set %}…{% endset %}"),
        Stmt::FilterBlock(_) => Some("{% filter %}"),
        Stmt::Macro(_) => Some("{% macro %}"),
        Stmt::CallBlock(_) => Some("{% call %}"),
        Stmt::Template(t) => body(&t.children),
        Stmt::ForLoop(f) => body(&f.body).or_else(|| body(&f.else_body)),
        Stmt::IfCond(i) => body(&i.true_body).or_else(|| body(&i.false_body)),
        Stmt::WithBlock(w) => body(&w.body),
        Stmt::AutoEscape(a) => body(&a.body),
        Stmt::Block(b) => body(&b.body),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::refuse;

    #[test]
    fn capturing_statements_are_refused_wherever_they_are() {
        for (src, what) in [
            ("{% set s %}x{% endset %}{{ s }}", "{% set %}"),
            ("{% if a %}{% for i in x %}{% filter upper %}x{% endfilter %}{% endfor %}{% endif %}", "{% filter %}"),
            ("{% macro f(n) %}{{ n }}{% endmacro %}{{ f(1) }}", "{% macro %}"),
            ("{% with a = 1 %}{% call f() %}x{% endcall %}{% endwith %}", "{% call %}"),
        ] {
            let err = refuse(src).unwrap_err();
            assert!(err.starts_with(&format!("`{what}")), "{src}: {err}");
        }
        for src in [
            "{% set s = 'x' %}{{ s }}",
            "{% for i in range(3) %}{{ i }}{% endfor %}",
            "{% if a %}b{% else %}c{% endif %}",
            "plain {{ text }}",
            "{% broken",
        ] {
            assert_eq!(refuse(src), Ok(()), "{src}");
        }
    }
}
