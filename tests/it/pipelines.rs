//! Pipelines through the CLI: the shipped pipelines' tests, a failing test's diff, dry runs,
//! and `check` errors in pipeline files with their exact places.

use crate::helpers::*;
use std::process::Command;

fn perkflow(dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_perkflow"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_shipped_pipeline_passes_its_tests() {
    let (code, out, err) = perkflow(&repo(""), &["test"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let summary = out.lines().last().unwrap_or_default();
    assert!(summary.ends_with("passed, 0 failed"), "{out}");
    let passed: usize = summary.split_whitespace().next().unwrap().parse().unwrap();
    assert!(passed >= 6, "{out}");
}

#[test]
fn dry_run_shows_steps_and_deliveries_and_sends_nothing() {
    let (code, out, err) = perkflow(
        &repo(""),
        &[
            "run",
            "shopify-order-points",
            "--fixture",
            "fixtures/shopify/orders-paid.json",
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("step  steps[1].set") && out.contains("\"points\":1255"),
        "{out}"
    );
    assert!(out.contains("deliver sms.send_sms"), "{out}");
    assert!(out.contains("\"outcome\":\"completed\""), "{out}");
}

/// A credential from an unset variable: the dry run shows the reference as written (it
/// needs no secrets), never a debug form.
#[test]
fn a_dry_run_shows_an_unset_credential_as_its_reference() {
    let dir = project(
        "pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps:\n  - deliver: { to: sms.send_sms, with: { to: \"+15555550123\", body: hi } }\n",
    );
    std::fs::write(
        dir.path().join("perkflow.yaml"),
        CONFIG.replace(
            "account_sid: a",
            "account_sid: \"${PERKFLOW_TEST_UNSET_SID}\"",
        ),
    )
    .unwrap();
    let (code, out, err) = perkflow(
        dir.path(),
        &["run", "p", "--fixture", "fixtures/orders-paid.json"],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("/Accounts/$%7BPERKFLOW_TEST_UNSET_SID%7D/Messages.json"),
        "{out}"
    );
    assert!(!out.contains("Interpolated"), "{out}");
}

/// `perkflow check`'s problems in `dir`, which must make it exit 1.
fn check_fails(dir: &std::path::Path) -> String {
    let (code, _out, err) = perkflow(dir, &["check"]);
    assert_eq!(code, Some(1), "{err}");
    err
}

const CONFIG: &str = "sources:\n  shop: { connector: shopify, secret: s }\nsinks:\n  sms: { connector: twilio_sms, account_sid: a, auth_token: b, base_url: \"http://127.0.0.1:9\" }\n";

fn project(pipeline: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("perkflow.yaml"), CONFIG).unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(dir.path().join("pipelines/p.yaml"), pipeline).unwrap();
    std::fs::create_dir_all(dir.path().join("fixtures")).unwrap();
    for f in ["orders-paid.json", "orders-paid.headers.yaml"] {
        std::fs::copy(
            repo(&format!("fixtures/shopify/{f}")),
            dir.path().join("fixtures").join(f),
        )
        .unwrap();
    }
    dir
}

#[test]
fn a_failing_test_shows_what_differs() {
    let dir = project(
        "pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps:\n  - set: { points: \"{{ 2 * 2 }}\" }\n  - deliver: { to: sms.send_sms, with: { body: \"{{ points }} points\" } }\ntests:\n  - name: wrong expectation\n    fixture: fixtures/orders-paid.json\n    expect:\n      values: { points: 5 }\n      deliveries: [{ to: sms.send_sms, with: { body: \"5 points\" } }]\n",
    );
    let (code, out, err) = perkflow(dir.path(), &["test"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("FAIL  p :: wrong expectation"), "{out}");
    assert!(
        out.contains("deliveries[0].with.body: expected \"5 points\", got \"4 points\""),
        "{out}"
    );
    assert!(out.contains("values.points: expected 5, got 4"), "{out}");
    assert!(out.trim_end().ends_with("0 passed, 1 failed"), "{out}");
}

#[test]
fn check_reports_pipeline_problems_at_their_place() {
    let dir = project(
        "pipeline: p\non: { source: shop, events: [orders/payed] }\nsteps:\n  - wen: \"true\"\n  - set: { x: \"{{ 1 + }}\" }\n  - deliver: { to: smss.send_sms }\n  - deliver: { to: nodot }\n  - deliver: { to: sms.send_smss }\n  - when: \"evnt.total_price > 1\"\n",
    );
    let err = check_fails(dir.path());
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines[0].starts_with("pipelines/p.yaml:2:30: on.events[0]: connector `shopify` does not emit `orders/payed` (did you mean `orders/paid`?)"), "{err}");
    assert!(
        lines[1].starts_with("pipelines/p.yaml:4:5: steps[0]: unknown variant `wen`")
            && lines[1].contains("(did you mean `when`?)"),
        "{err}"
    );
    assert!(
        lines[2].starts_with("pipelines/p.yaml:5:15: steps[1].set.x: syntax error"),
        "{err}"
    );
    assert_eq!(lines[3], "pipelines/p.yaml:6:20: steps[2].deliver.to: unknown sink `smss` (did you mean `sms`?); sinks in the config: sms");
    assert_eq!(lines[4], "pipelines/p.yaml:7:20: steps[3].deliver.to: `nodot`: write the target as `<sink>.<action>`");
    assert_eq!(lines[5], "pipelines/p.yaml:8:20: steps[4].deliver.to: sink connector `twilio_sms` has no action `send_smss` (did you mean `send_sms`?); actions: send_sms");
    assert!(
        lines[6].starts_with(
            "pipelines/p.yaml:9:11: steps[5].when: unknown variable `evnt` (did you mean `event`?)"
        ),
        "{err}"
    );
    assert_eq!(lines.last().copied(), Some("7 problems found"));
}

#[test]
fn a_failed_dry_run_exits_1_and_names_the_step() {
    let dir = project(
        "pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps:\n  - set: { x: \"{{ event.email * 'a' }}\" }\n",
    );
    let (code, out, err) = perkflow(
        dir.path(),
        &["run", "p", "--fixture", "fixtures/orders-paid.json"],
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("\"outcome\":\"failed\""), "{out}");
    assert!(
        err.starts_with("error: the run failed at steps[0].set.x: "),
        "{err}"
    );
}

#[test]
fn a_fixture_without_its_headers_file_says_what_is_missing() {
    let dir = project("pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps: []\n");
    std::fs::copy(
        dir.path().join("fixtures/orders-paid.json"),
        dir.path().join("fixtures/copy.json"),
    )
    .unwrap();
    let (code, _, err) = perkflow(dir.path(), &["run", "p", "--fixture", "fixtures/copy.json"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no event id (header `X-Shopify-Event-Id` or `shopify-event-id` or `X-Shopify-Webhook-Id` or `shopify-webhook-id`)"),
        "{err}"
    );
    assert!(
        err.contains("copy.headers.yaml, which does not exist; or give them with `headers:` in a test, `--header` to `run`)"),
        "{err}"
    );
    // Given on the command line instead.
    let (code, out, err) = perkflow(
        dir.path(),
        &[
            "run",
            "p",
            "--fixture",
            "fixtures/copy.json",
            "--header",
            "X-Shopify-Topic: orders/paid",
            "--header",
            "X-Shopify-Event-Id:evt-77",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("event: shop orders/paid (vendor id evt-77)"),
        "{out}"
    );
    let (code, _, err) = perkflow(
        dir.path(),
        &[
            "run",
            "p",
            "--fixture",
            "fixtures/copy.json",
            "--header",
            "nocolon",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--header `nocolon`: write it as 'Name: value'"),
        "{err}"
    );
}

#[test]
fn unknown_pipeline_names_get_a_did_you_mean() {
    let dir = project("pipeline: points\non: { source: shop, events: [orders/paid] }\nsteps: []\n");
    let (code, _, err) = perkflow(dir.path(), &["test", "pints"]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err.trim(),
        "error: no pipeline `pints` (did you mean `points`?)"
    );
    let (code, _, err) = perkflow(
        dir.path(),
        &["run", "pointz", "--fixture", "fixtures/orders-paid.json"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err.trim(),
        "error: no pipeline `pointz` (did you mean `points`?)"
    );
}

#[test]
fn a_duplicate_pipeline_is_reported_at_its_name() {
    let dir = project("pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps: []\n");
    std::fs::write(
        dir.path().join("pipelines/q.yaml"),
        "# a copy\n\npipeline: p\non: { source: shop, events: [orders/paid] }\nsteps: []\n",
    )
    .unwrap();
    let err = check_fails(dir.path());
    assert!(
        err.starts_with("pipelines/q.yaml:3:11: pipeline: pipeline `p` is also defined in "),
        "{err}"
    );
}

#[test]
fn printing_into_a_closed_pipe_ends_quietly() {
    // A pipe whose reading end is closed before the command starts, as `| head -0` leaves it.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_perkflow"))
        .args(["test"])
        .current_dir(repo(""))
        .stdout(writer)
        .output()
        .unwrap();
    let (status, err) = (out.status, String::from_utf8_lossy(&out.stderr));
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(13), "{status:?} {err}");
}

#[test]
fn a_refused_source_sink_or_pool_is_reported_once_not_at_every_use() {
    let dir = project(
        "pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps:\n  - loyalty.issue_code: { pool: thanks, member: \"{{ event.email }}\" }\n  - deliver: { to: sms.send_sms, with: { to: \"+15555550123\", body: \"{{ code }}\" } }\n",
    );
    std::fs::write(
        dir.path().join("perkflow.yaml"),
        "sources:\n  shop: { connector: shopify, secret: s, tolerance: [300] }\nsinks:\n  sms: { connector: twilio_sms, account_sid: a, auth_token: b, bogus: 1 }\npromo_codes:\n  thanks: { prefix: THANKS-, expires_after: soon }\n",
    )
    .unwrap();
    let err = check_fails(dir.path());
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 4, "{err}");
    assert!(lines[0].starts_with("perkflow.yaml:2:"), "{err}");
    assert!(lines[1].starts_with("perkflow.yaml:4:"), "{err}");
    assert!(lines[2].starts_with("perkflow.yaml:6:"), "{err}");
    assert_eq!(lines[3], "3 problems found", "{err}");
}

#[test]
fn check_reports_with_keys_the_action_does_not_read() {
    let dir = project(
        "pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps:\n  - deliver:\n      to: sms.send_sms\n      with: { too: \"+15555550123\", body: hi }\n",
    );
    let err = check_fails(dir.path());
    let lines: Vec<&str> = err.lines().collect();
    let expected = [
        "pipelines/p.yaml:6:15: steps[0].deliver.with.too: `sms.send_sms` does not read `too` (did you mean `to`?); it reads: body, media_url, to",
        "1 problem found",
    ];
    assert_eq!(lines, expected, "{err}");
}

#[test]
fn check_refuses_statements_that_capture_output() {
    let dir = project(
        "pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps:\n  - set: { x: \"{% macro f() %}x{% endmacro %}{{ f() }}\" }\n",
    );
    let err = check_fails(dir.path());
    assert!(
        err.starts_with("pipelines/p.yaml:4:15: steps[0].set.x: invalid operation: `{% macro %}` is not available in perkflow fields"),
        "{err}"
    );
}

#[test]
fn check_reports_unknown_filters_and_tests() {
    let dir = project(
        "pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps:\n  - when: \"event.email is definedd\"\n  - set: { mail: \"{{ event.email | lowr }}\" }\n  - deliver: { to: sms.send_sms, with: { to: \"+15555550123\", body: \"Hi {{ mail | nosuch }}\" } }\n",
    );
    let err = check_fails(dir.path());
    let lines: Vec<&str> = err.lines().collect();
    let expected = [
        "pipelines/p.yaml:4:11: steps[0].when: unknown test `definedd` (did you mean `defined`?)",
        "pipelines/p.yaml:5:18: steps[1].set.mail: unknown filter `lowr` (did you mean `lower`?)",
        "pipelines/p.yaml:6:68: steps[2].deliver.with.body: unknown filter `nosuch`",
        "3 problems found",
    ];
    assert_eq!(lines, expected, "{err}");
}

#[test]
fn check_reports_loyalty_and_schedule_problems_at_their_place() {
    let dir = project(
        "pipeline: p\non:\n  schedule: { cron: \"0 25 * * *\", tz: Mars/Base, members: birthday, where: \"member.x ==\" }\nsteps:\n  - loyalty.accrue: { member: x, points: 1, hold: forever }\n  - loyalty.redeem: { member: x, points: 1, hold: 1d }\n  - loyalty.reverse: { key: k, cancel: [smss] }\n  - deliver: { to: sms.send_sms, with: { to: a }, keep: { member: x, as: \"bad name\", from: promo } }\n",
    );
    let err = check_fails(dir.path());
    let lines: Vec<&str> = err.lines().collect();
    let expected = [
        "pipelines/p.yaml:3:21: on.schedule.cron: `0 25 * * *` is not a cron pattern (Component error: Number out of bounds.); e.g. `0 9 * * *` (09:00 every day)",
        "pipelines/p.yaml:3:39: on.schedule.tz: unknown time zone `Mars/Base` (an IANA name: `Europe/Paris`)",
        "pipelines/p.yaml:3:76: on.schedule.where: syntax error: unexpected end of input, expected expression (in <expression>:1)",
        "pipelines/p.yaml:5:51: steps[0].loyalty.accrue.hold: `forever` is not a positive duration (`14d`, `36h`)",
        "pipelines/p.yaml:6:51: steps[1].loyalty.redeem.hold: only accruals are held (this is `loyalty.redeem`)",
        "pipelines/p.yaml:7:41: steps[2].loyalty.reverse.cancel[0]: unknown sink `smss` (did you mean `sms`?)",
        "pipelines/p.yaml:8:74: steps[3].deliver.keep.as: `bad name`: an attribute name is 1 to 64 letters, digits or `_`",
        "pipelines/p.yaml:8:92: steps[3].deliver.keep.from: `promo` is not a JSON pointer into the answer (`/promo_code`)",
        "8 problems found",
    ];
    assert_eq!(lines, expected, "{err}");
}

#[test]
fn check_reports_lookup_problems_at_their_place() {
    let dir = project(
        "pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps:\n  - lookup: { from: sms.send_sms, as: event }\n  - lookup: { from: sms.nope, as: 1x, with: { id: \"{{ evnt.id }}\" } }\n  - lookup: { from: sms.send_sms, as: answer }\n  - set: { y: \"{{ answer.sid }}\" }\n",
    );
    let err = check_fails(dir.path());
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines[0], "pipelines/p.yaml:4:21: steps[0].lookup.from: `sms.send_sms` is a POST that changes something at the vendor; a lookup may only read (use `deliver` to send it)", "{err}");
    assert_eq!(lines[1], "pipelines/p.yaml:4:39: steps[0].lookup.as: `event` is provided by every run and cannot be set", "{err}");
    assert_eq!(lines[2], "pipelines/p.yaml:5:21: steps[1].lookup.from: sink connector `twilio_sms` has no action `nope`; actions: send_sms", "{err}");
    assert_eq!(lines[3], "pipelines/p.yaml:5:35: steps[1].lookup.as: `1x`: a variable name is letters, digits and `_`, not starting with a digit", "{err}");
    assert_eq!(
        lines[4],
        "pipelines/p.yaml:5:51: steps[1].lookup.with.id: unknown variable `evnt` (did you mean `event`?): only event, source, type, event_id, headers and the variables of earlier `set` and `lookup` steps exist",
        "{err}"
    );
    assert_eq!(lines[5], "pipelines/p.yaml:6:21: steps[2].lookup.from: `sms.send_sms` is a POST that changes something at the vendor; a lookup may only read (use `deliver` to send it)", "{err}");
    // `answer` is known to later steps: no unknown-variable error for it.
    assert_eq!(lines.last().copied(), Some("6 problems found"), "{err}");
}

#[test]
fn dry_run_prints_each_lookup_request_and_uses_the_given_answers() {
    let (code, out, err) = perkflow(
        &repo(""),
        &[
            "run",
            "quickbooks-invoice-paid",
            "--fixture",
            "fixtures/quickbooks/cloudevents-payment-created.json",
            "--lookup",
            "payment=fixtures/quickbooks/api/payment-118743.json",
            "--lookup",
            "invoice=fixtures/quickbooks/api/invoice-240611.json",
            "--lookup",
            "customer=fixtures/quickbooks/api/customer-58.json",
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("lookup payment = accounting.payment (answer from --lookup)\n  GET http://127.0.0.1:8090/quickbooks/v3/company/9341453172471531/payment/118743?minorversion=75"), "{out}");
    assert!(out.contains("lookup customer = accounting.customer (answer from --lookup)\n  GET http://127.0.0.1:8090/quickbooks/v3/company/9341453172471531/customer/58?minorversion=75"), "{out}");
    assert!(out.contains("\"outcome\":\"completed\""), "{out}");
    assert!(
        out.contains("\"to\": \"dana@harborstreetbakery.example\""),
        "{out}"
    );

    // Without an answer the run fails (exit 1), saying how to give one; nothing is called.
    let (code, out, err) = perkflow(
        &repo(""),
        &[
            "run",
            "quickbooks-invoice-paid",
            "--fixture",
            "fixtures/quickbooks/cloudevents-payment-created.json",
        ],
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("lookup payment = accounting.payment (no answer given)"),
        "{out}"
    );
    assert!(
        out.contains("`--lookup payment=FILE` for `perkflow run`"),
        "{out}"
    );
    assert!(!out.contains("deliver "), "{out}");
}
