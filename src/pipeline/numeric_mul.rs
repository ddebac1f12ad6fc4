//! `*` multiplies numbers, and only numbers, in perkflow's expressions and templates.
//!
//! minijinja's `*` also repeats a string or a list (`items * 1000000`) in one operation,
//! which neither the fuel limit nor the output limit sees: fuzzing built a list of millions
//! of items (1.7 GB) from `99*items*50728`, and a factor taken from a payload would let a
//! sender do the same. minijinja has no hook for its operators, so each operand of every
//! `*` is passed through [`GUARD`] before it is used: the source is parsed with minijinja's
//! own parser and `GUARD(` … `)` is inserted around the operands at the places the parser
//! gives. `GUARD` hands numbers (and `none`/undefined, whose errors stay minijinja's) back
//! unchanged and refuses strings, lists, maps and other sequences.

use minijinja::machinery::ast::{CallArg, Expr, Stmt};
use minijinja::value::ValueKind;
use minijinja::{Error, ErrorKind, Value};
use std::borrow::Cow;

/// The guard's name: a global function of perkflow's environments, not for pipelines.
pub const GUARD: &str = "__perkflow_number";

/// The guard itself.
pub fn guard(v: Value) -> Result<Value, Error> {
    match v.kind() {
        ValueKind::String
        | ValueKind::Bytes
        | ValueKind::Seq
        | ValueKind::Map
        | ValueKind::Iterable
        | ValueKind::Plain => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "`*` multiplies numbers; it does not repeat a {} here",
                v.kind()
            ),
        )),
        _ => Ok(v),
    }
}

/// `src` with every operand of `*` guarded (`expr`: a bare expression, else a template).
/// A source that does not parse is returned as it is: compiling it reports the error.
pub fn guarded(src: &str, expr: bool) -> Result<Cow<'_, str>, String> {
    if src.contains(GUARD) {
        return Err(format!("`{GUARD}` is a name reserved by perkflow"));
    }
    if !src.contains('*') {
        return Ok(Cow::Borrowed(src));
    }
    let mut operands = Vec::new();
    if expr {
        match minijinja::machinery::parse_expr(src) {
            Ok(e) => walk_expr(&e, 0, &mut operands),
            Err(_) => return Ok(Cow::Borrowed(src)),
        }
    } else {
        match minijinja::machinery::parse(src, "<template>", Default::default()) {
            Ok(s) => walk_stmt(&s, 0, &mut operands),
            Err(_) => return Ok(Cow::Borrowed(src)),
        }
    }
    if operands.is_empty() {
        return Ok(Cow::Borrowed(src));
    }
    // A span may leave out brackets around part of the operand (`(a) | f` spans `a) | f`):
    // each operand grows until every bracket in it has its partner in it too.
    let pairs = bracket_pairs(src, expr);
    for (_, start, end) in operands.iter_mut() {
        balance(&pairs, start, end);
    }
    // Insertions: (offset, closes first, order among equals, text). At one offset, closing
    // parentheses go before opening calls; inner closes before outer ones, outer opens
    // before inner ones.
    let mut inserts: Vec<(usize, u8, i64, &str)> = Vec::new();
    let open = format!("{GUARD}(");
    for (depth, start, end) in operands {
        inserts.push((start, 1, depth as i64, &open));
        inserts.push((end, 0, -(depth as i64), ")"));
    }
    inserts.sort();
    let mut out = String::with_capacity(src.len() + inserts.len() * (GUARD.len() + 1));
    let mut at = 0;
    for (offset, _, _, text) in &inserts {
        let Some(piece) = src.get(at..*offset) else {
            return Err("cannot place `*`'s operands in this source".into());
        };
        out.push_str(piece);
        out.push_str(text);
        at = *offset;
    }
    out.push_str(&src[at..]);
    Ok(Cow::Owned(out))
}

type Operands = Vec<(usize, usize, usize)>;

/// Offsets of matching brackets (`()`, `[]`, `{}`), each pair both ways, from minijinja's
/// tokens (so brackets inside strings do not count).
fn bracket_pairs(src: &str, expr: bool) -> std::collections::HashMap<usize, usize> {
    use minijinja::machinery::{tokenize, Token};
    let mut pairs = std::collections::HashMap::new();
    let mut open: Vec<usize> = Vec::new();
    for item in tokenize(src, expr, Default::default()) {
        let Ok((token, span)) = item else { break };
        let at = span.start_offset as usize;
        match token {
            Token::ParenOpen | Token::BracketOpen | Token::BraceOpen => open.push(at),
            Token::ParenClose | Token::BracketClose | Token::BraceClose => {
                if let Some(o) = open.pop() {
                    pairs.insert(o, at);
                    pairs.insert(at, o);
                }
            }
            _ => {}
        }
    }
    pairs
}

/// Grows `start..end` until no bracket in it has its partner outside.
fn balance(pairs: &std::collections::HashMap<usize, usize>, start: &mut usize, end: &mut usize) {
    loop {
        let outside = pairs
            .iter()
            .filter(|(at, _)| (*start..*end).contains(*at))
            .map(|(_, partner)| *partner)
            .filter(|p| !(*start..*end).contains(p))
            .collect::<Vec<_>>();
        if outside.is_empty() {
            return;
        }
        for p in outside {
            *start = (*start).min(p);
            *end = (*end).max(p + 1);
        }
    }
}

/// Where `e`'s text lies: its own span joined with its parts' (a filter's or an attribute's
/// span starts at its name, not at the value it applies to).
fn span_of(e: &Expr) -> (usize, usize) {
    let s = e.span();
    let (mut start, mut end) = (s.start_offset as usize, s.end_offset as usize);
    let mut join = |x: &Expr| {
        let (a, b) = span_of(x);
        start = start.min(a);
        end = end.max(b);
    };
    match e {
        Expr::Var(_) | Expr::Const(_) => {}
        Expr::Slice(x) => {
            join(&x.expr);
            [&x.start, &x.stop, &x.step]
                .into_iter()
                .flatten()
                .for_each(join);
        }
        Expr::UnaryOp(x) => join(&x.expr),
        Expr::BinOp(x) => {
            join(&x.left);
            join(&x.right);
        }
        Expr::Compare(x) => {
            join(&x.expr);
            x.ops.iter().for_each(|o| join(&o.expr));
        }
        Expr::IfExpr(x) => {
            join(&x.test_expr);
            join(&x.true_expr);
            if let Some(f) = &x.false_expr {
                join(f);
            }
        }
        Expr::Filter(x) => {
            if let Some(v) = &x.expr {
                join(v);
            }
            x.args.iter().for_each(|a| join(arg(a)));
        }
        Expr::Test(x) => {
            join(&x.expr);
            x.args.iter().for_each(|a| join(arg(a)));
        }
        Expr::GetAttr(x) => join(&x.expr),
        Expr::GetItem(x) => {
            join(&x.expr);
            join(&x.subscript_expr);
        }
        Expr::Call(x) => {
            join(&x.expr);
            x.args.iter().for_each(|a| join(arg(a)));
        }
        Expr::List(x) => x.items.iter().for_each(join),
        Expr::Tuple(x) => x.items.iter().for_each(join),
        Expr::Map(x) => x.keys.iter().chain(&x.values).for_each(join),
    }
    (start, end)
}

fn arg<'e, 'a>(a: &'e CallArg<'a>) -> &'e Expr<'a> {
    match a {
        CallArg::Pos(e) | CallArg::Kwarg(_, e) | CallArg::PosSplat(e) | CallArg::KwargSplat(e) => e,
    }
}

fn walk_expr(e: &Expr, depth: usize, out: &mut Operands) {
    match e {
        Expr::Var(_) | Expr::Const(_) => {}
        Expr::Slice(s) => {
            walk_expr(&s.expr, depth, out);
            for part in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                walk_expr(part, depth, out);
            }
        }
        Expr::UnaryOp(u) => walk_expr(&u.expr, depth, out),
        Expr::BinOp(b) => {
            if matches!(b.op, minijinja::machinery::ast::BinOpKind::Mul) {
                for side in [&b.left, &b.right] {
                    let (start, end) = span_of(side);
                    out.push((depth, start, end));
                }
            }
            walk_expr(&b.left, depth + 1, out);
            walk_expr(&b.right, depth + 1, out);
        }
        Expr::Compare(c) => {
            walk_expr(&c.expr, depth, out);
            for op in &c.ops {
                walk_expr(&op.expr, depth, out);
            }
        }
        Expr::IfExpr(i) => {
            walk_expr(&i.test_expr, depth, out);
            walk_expr(&i.true_expr, depth, out);
            if let Some(f) = &i.false_expr {
                walk_expr(f, depth, out);
            }
        }
        Expr::Filter(f) => {
            if let Some(x) = &f.expr {
                walk_expr(x, depth, out);
            }
            walk_args(&f.args, depth, out);
        }
        Expr::Test(t) => {
            walk_expr(&t.expr, depth, out);
            walk_args(&t.args, depth, out);
        }
        Expr::GetAttr(g) => walk_expr(&g.expr, depth, out),
        Expr::GetItem(g) => {
            walk_expr(&g.expr, depth, out);
            walk_expr(&g.subscript_expr, depth, out);
        }
        Expr::Call(c) => {
            walk_expr(&c.expr, depth, out);
            walk_args(&c.args, depth, out);
        }
        Expr::List(l) => l.items.iter().for_each(|i| walk_expr(i, depth, out)),
        Expr::Tuple(t) => t.items.iter().for_each(|i| walk_expr(i, depth, out)),
        Expr::Map(m) => {
            for (k, v) in m.keys.iter().zip(&m.values) {
                walk_expr(k, depth, out);
                walk_expr(v, depth, out);
            }
        }
    }
}

fn walk_args(args: &[CallArg], depth: usize, out: &mut Operands) {
    args.iter().for_each(|a| walk_expr(arg(a), depth, out));
}

fn walk_body(body: &[Stmt], depth: usize, out: &mut Operands) {
    body.iter().for_each(|s| walk_stmt(s, depth, out));
}

fn walk_stmt(s: &Stmt, depth: usize, out: &mut Operands) {
    match s {
        Stmt::Template(t) => walk_body(&t.children, depth, out),
        Stmt::EmitExpr(e) => walk_expr(&e.expr, depth, out),
        Stmt::EmitRaw(_) => {}
        Stmt::ForLoop(f) => {
            walk_expr(&f.iter, depth, out);
            if let Some(x) = &f.filter_expr {
                walk_expr(x, depth, out);
            }
            walk_body(&f.body, depth, out);
            walk_body(&f.else_body, depth, out);
        }
        Stmt::IfCond(i) => {
            walk_expr(&i.expr, depth, out);
            walk_body(&i.true_body, depth, out);
            walk_body(&i.false_body, depth, out);
        }
        Stmt::WithBlock(w) => {
            for (_, v) in &w.assignments {
                walk_expr(v, depth, out);
            }
            walk_body(&w.body, depth, out);
        }
        Stmt::Set(x) => walk_expr(&x.expr, depth, out),
        Stmt::SetBlock(x) => {
            if let Some(f) = &x.filter {
                walk_expr(f, depth, out);
            }
            walk_body(&x.body, depth, out);
        }
        Stmt::AutoEscape(a) => {
            walk_expr(&a.enabled, depth, out);
            walk_body(&a.body, depth, out);
        }
        Stmt::FilterBlock(f) => {
            walk_expr(&f.filter, depth, out);
            walk_body(&f.body, depth, out);
        }
        Stmt::Block(b) => walk_body(&b.body, depth, out),
        Stmt::Extends(x) => walk_expr(&x.name, depth, out),
        Stmt::Include(x) => walk_expr(&x.name, depth, out),
        Stmt::Import(x) => walk_expr(&x.expr, depth, out),
        Stmt::FromImport(x) => walk_expr(&x.expr, depth, out),
        Stmt::Macro(m) => {
            m.defaults.iter().for_each(|d| walk_expr(d, depth, out));
            walk_body(&m.body, depth, out);
        }
        Stmt::CallBlock(c) => {
            walk_expr(&c.call.expr, depth, out);
            walk_args(&c.call.args, depth, out);
            // `{% call(x = …) m() %}`: the caller's parameter defaults.
            c.macro_decl
                .defaults
                .iter()
                .for_each(|d| walk_expr(d, depth, out));
            walk_body(&c.macro_decl.body, depth, out);
        }
        Stmt::Do(d) => {
            walk_expr(&d.call.expr, depth, out);
            walk_args(&d.call.args, depth, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(src: &str, expr: bool) -> String {
        guarded(src, expr).unwrap().replace(GUARD, "N")
    }

    #[test]
    fn guards_each_operand_of_every_multiplication() {
        assert_eq!(g("points * 2", true), "N(points) * N(2)");
        assert_eq!(g("a * b * c", true), "N(N(a) * N(b)) * N(c)");
        assert_eq!(g("(a + b) * c", true), "(N(a + b)) * N(c)");
        assert_eq!(g("a * (b + c)", true), "N(a) * (N(b + c))");
        assert_eq!(g("x | float * 10", true), "N(x | float) * N(10)");
        assert_eq!(
            g("(x | float * 10) | round | int", true),
            "(N(x | float) * N(10)) | round | int"
        );
        assert_eq!(g("99*items*50728", true), "N(N(99)*N(items))*N(50728)");
        assert_eq!(g("f(a*b, k=c*d)", true), "f(N(a)*N(b), k=N(c)*N(d))");
        assert_eq!(g("[a*2][0] ** 2", true), "[N(a)*N(2)][0] ** 2");
        assert_eq!(g("x.y[1] * -z", true), "N(x.y[1]) * N(-z)");
        assert_eq!(
            g("a * b if c * d else e", true),
            "N(a) * N(b) if N(c) * N(d) else e"
        );
        assert_eq!(g("no stars", true), "no stars");
        // Brackets a span leaves out are taken in: the guard sees the whole operand.
        assert_eq!(g("(a) | f * 2", true), "N((a) | f) * N(2)");
        assert_eq!(g("(x) | string * 3", true), "N((x) | string) * N(3)");
        assert_eq!(
            g(
                "(event.total_price | money(event.currency)).minor * 10 // 100",
                true
            ),
            "N((event.total_price | money(event.currency)).minor) * N(10) // 100"
        );
        assert_eq!(g("((a)) * 2", true), "((N(a))) * N(2)");
        assert_eq!(g("'(' ~ a * 2", true), "'(' ~ N(a) * N(2)");
        assert_eq!(g("[a, (b)][0] * 2", true), "N([a, (b)][0]) * N(2)");
        assert_eq!(g("{'k': (v)}['k'] * 2", true), "N({'k': (v)}['k']) * N(2)");
        assert_eq!(
            g("Hi {{ a * 2 }} {% set b = c * d %}{% for i in range(n * 2) %}{{ i }}{% endfor %}", false),
            "Hi {{ N(a) * N(2) }} {% set b = N(c) * N(d) %}{% for i in range(N(n) * N(2)) %}{{ i }}{% endfor %}"
        );
        assert_eq!(
            g("a * in text, {{ 2 ** 3 }}", false),
            "a * in text, {{ 2 ** 3 }}"
        );
        assert_eq!(
            g("{% macro m() %}{{ caller() }}{% endmacro %}{% call(s = x * 3) m() %}{{ s }}{% endcall %}", false),
            "{% macro m() %}{{ caller() }}{% endmacro %}{% call(s = N(x) * N(3)) m() %}{{ s }}{% endcall %}"
        );
        assert_eq!(
            g("{% macro m(a = b * 2) %}{% endmacro %}{# 2 * x #}{% raw %}{{ 3 * y }}{% endraw %}", false),
            "{% macro m(a = N(b) * N(2)) %}{% endmacro %}{# 2 * x #}{% raw %}{{ 3 * y }}{% endraw %}"
        );
        assert!(guarded(&format!("{GUARD}(1)"), true).is_err());
    }
}
