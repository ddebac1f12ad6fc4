//! `perkflow check`: every problem of a config as `file:line:col: path: message`, exit 1, no
//! secrets needed. One case per error class in `fixtures/config/<case>.yaml`, its exact stderr
//! in `<case>.expected`. Plus: a valid config whose secrets are unset passes `check` while
//! `serve` refuses to start, naming the variable and its place and printing no secret.

use crate::helpers::repo;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every error class, each with its own fixture. A case `name` reads `name.yaml`, or
/// `name/perkflow.yaml` when the case needs a directory (its own `connectors/`).
const CASES: &[&str] = &[
    "yaml_syntax",
    "unknown_top_key",
    "unknown_source_field",
    "unknown_connector",
    "wrong_type",
    "bad_duration",
    "bad_listen",
    "bad_public_url",
    "missing_secret",
    "secret_and_secrets",
    "field_not_for_connector",
    "square_without_url",
    "paypal_missing_webhook_id",
    "paypal_api_without_credentials",
    "paypal_cert_pins_missing_file",
    "bad_reference",
    "sink_unknown_connector",
    "sink_params",
    "sink_limits",
    "several_problems",
    "top_level_and_sources",
    "user_connectors",
    "api_key_scope",
    "dedup_window",
];

/// The valid config: its secrets reference a variable that is never set.
const VALID: &str = "valid_unset_env.yaml";
const UNSET: &str = "UNSET_VARIABLE_FOR_TEST";
/// Literal secrets written in `VALID`, which nothing may ever print.
const LITERALS: &[&str] = &[
    "literal-shop-secret-do-not-print",
    "whsec_literal_old_do_not_print",
];

fn dir() -> PathBuf {
    repo("fixtures/config")
}

fn config_arg(case: &str) -> String {
    if dir().join(format!("{case}.yaml")).is_file() {
        format!("{case}.yaml")
    } else {
        format!("{case}/perkflow.yaml")
    }
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the real binary in `fixtures/config/` with `args`, an empty environment plus `env`,
/// and kills it if it has not exited within 30 s.
fn run(args: &[&str], env: &[(&str, &str)]) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (tmp.path().join("stdout"), tmp.path().join("stderr"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_perkflow"));
    cmd.args(args)
        .current_dir(dir())
        .env_clear()
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn perkflow");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "perkflow {args:?} did not exit within 30 s; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: std::fs::read_to_string(&out_path).unwrap(),
        stderr: std::fs::read_to_string(&err_path).unwrap(),
    }
}

#[test]
fn every_error_class_is_reported_with_its_exact_place() {
    let mut failures = Vec::new();
    for case in CASES {
        let expected = std::fs::read_to_string(dir().join(format!("{case}.expected")))
            .unwrap_or_else(|e| panic!("{case}.expected: {e}"));
        let cfg = config_arg(case);
        // No environment at all: `check` needs no secret values.
        let r = run(&["check", "-c", &cfg], &[]);
        if r.code != Some(1) || r.stderr != expected || !r.stdout.is_empty() {
            failures.push(format!(
                "case {case} (-c {cfg}): exit {:?}\n--- expected stderr\n{expected}--- actual stderr\n{}--- stdout\n{}",
                r.code, r.stderr, r.stdout
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_fixture_is_a_case() {
    // A fixture nobody runs is a test that silently stopped testing.
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let case = match name.rsplit_once('.') {
            Some((stem, "yaml" | "expected")) => stem.to_string(),
            _ if path.is_dir() => name,
            _ => panic!("unexpected file in fixtures/config: {name}"),
        };
        seen.push(case);
    }
    for case in &seen {
        assert!(
            CASES.contains(&case.as_str()) || format!("{case}.yaml") == VALID,
            "fixtures/config/{case} is not a case of this test"
        );
    }
    for case in CASES {
        assert!(
            Path::new(&dir().join(config_arg(case))).is_file(),
            "no config for case {case}"
        );
    }
}

#[test]
fn unset_secrets_pass_check_but_stop_serve_naming_variable_and_place() {
    // `check` never reads a secret: the variable is unset and the config is valid.
    let r = run(&["check", "-c", VALID], &[]);
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (
            Some(0),
            "valid_unset_env.yaml: ok (3 sources, 0 sinks, 0 pipelines, 16 connectors)\n",
            ""
        ),
    );

    // `serve` resolves them, and refuses to start without them.
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let r = run(
        &[
            "serve",
            "-c",
            VALID,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ],
        // The most verbose logs: not even a trace line may carry a secret.
        &[("PERKFLOW_LOG", "trace")],
    );
    let all = format!("{}{}", r.stdout, r.stderr);
    assert_eq!(r.code, Some(1), "serve started without its secrets:\n{all}");
    assert!(
        !r.stdout.contains("listening"),
        "serve announced it was listening before failing:\n{all}"
    );
    // Every unresolvable reference is named at its place in the file, in file order.
    let stripe = format!(
        "valid_unset_env.yaml:8:47: sources.stripe.secrets[1]: environment variable {UNSET} is not set"
    );
    let woo = format!(
        "valid_unset_env.yaml:11:13: sources.woo.secret: environment variable {UNSET} is not set"
    );
    let (s, w) = (r.stderr.find(&stripe), r.stderr.find(&woo));
    assert!(
        matches!((s, w), (Some(s), Some(w)) if s < w),
        "expected both places in order:\n{}",
        r.stderr
    );
    for literal in LITERALS {
        assert!(!all.contains(literal), "a secret was printed:\n{all}");
    }
    assert!(
        !data_dir.exists() || std::fs::read_dir(&data_dir).unwrap().next().is_none(),
        "serve wrote data before its config was usable"
    );
}
