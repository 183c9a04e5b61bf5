//! The HTTP contract, against `strata up` holding a batch version and a speed tail of a real
//! stream, with a read key set:
//! - the read routes refuse a request without a key (401) and take the read key or the admin key;
//! - schemathesis (PyPI; `scripts/deps.sh` installs it into `$STRATA_CACHE/tools/py`) generates
//!   requests from `/v1/openapi.json` with every one of its checks on (server errors, status
//!   codes, content types, response schemas, headers, negative data rejected, valid data
//!   accepted, unsupported methods answered 405 with `Allow`, ...) and must report no failure.
//!   `STRATA_API_FUZZ_EXAMPLES` (default 100) sets the examples per operation and
//!   `STRATA_API_FUZZ_SEED` the seed (default: from the clock, printed for replay);
//! - every answer still equals the ground truth afterwards, and `strata verify` passes over
//!   plain HTTP and over HTTPS (a second `strata serve` on the same data directory with a
//!   throwaway CA's certificate), with the read key in force on both.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;
use strata_common::time::now_millis;

const READ_KEY: &str = "test-read-key";

/// schemathesis from `STRATA_SCHEMATHESIS`, else where `scripts/deps.sh` puts it.
fn schemathesis() -> PathBuf {
    let path = std::env::var_os("STRATA_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("STRATA_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/strata")
                });
            cache.join("tools/py/bin/schemathesis")
        });
    assert!(
        path.exists(),
        "schemathesis is not at {}: run scripts/deps.sh (or set STRATA_SCHEMATHESIS)",
        path.display()
    );
    path
}

#[test]
fn the_api_keeps_its_contract_under_a_schema_driven_fuzzer() {
    let fuzzer = schemathesis();
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let topic = unique_topic("e2e-api");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut common = layer_args(&topic, &dir.join("data"), 1_000, None);
    let mut args = up_args(&common, &addr, ADMIN_KEY);
    args.extend(["--read-key".into(), READ_KEY.into()]);
    let mut up = Proc::spawn("up", &args, dir);
    wait_http(&addr);

    // History in a batch version, and a tail in the speed layer only.
    let start = now_millis() - 6 * 3_600_000;
    let mut truth = Truth::default();
    truth.produce(&common, gen_config(71, 20_000, start, 5 * 3_600_000, true));
    wait_speed_offsets(&addr, truth.messages);
    run_batch(&addr, ADMIN_KEY, 0);
    truth.produce(
        &common,
        gen_config(72, 3_000, now_millis() - 3_600_000, 3_000_000, false),
    );
    wait_speed_offsets(&addr, truth.messages);

    // The read key is in force.
    assert_eq!(http(&addr, "GET", "/v1/status", &[]).0, 401);
    let read = format!("Bearer {READ_KEY}");
    assert_eq!(
        http(&addr, "GET", "/v1/status", &[("Authorization", &read)]).0,
        200
    );
    assert_eq!(
        http(&addr, "GET", "/v1/admin/views", &[("Authorization", &read)]).0,
        401,
        "the read key opens no admin route"
    );

    let examples = std::env::var("STRATA_API_FUZZ_EXAMPLES").unwrap_or_else(|_| "100".into());
    let seed = std::env::var("STRATA_API_FUZZ_SEED")
        .unwrap_or_else(|_| (now_millis().unsigned_abs() % 1_000_000).to_string());
    eprintln!("schemathesis: seed {seed} (replay with STRATA_API_FUZZ_SEED={seed}), {examples} examples per operation");
    let hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/api");
    let out = Command::new(&fuzzer)
        .args([
            "run",
            &format!("http://{addr}/v1/openapi.json"),
            "--checks",
            "all",
            "--max-examples",
            &examples,
            "--seed",
            &seed,
            "--header",
            &format!("Authorization: Bearer {ADMIN_KEY}"),
            "--request-timeout",
            "30",
            "--no-color",
        ])
        .env("SCHEMATHESIS_HOOKS", "schemathesis_hooks")
        .env("PYTHONPATH", &hooks)
        .current_dir(dir)
        .output()
        .expect("run schemathesis");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "{}",
        report
            .lines()
            .skip_while(|l| !l.contains("SUMMARY"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        out.status.success(),
        "schemathesis reported failures (seed {seed}):\n{report}"
    );
    assert!(
        report.contains("Tested: 16"),
        "every operation was tested:\n{report}"
    );
    up.assert_running();

    // Nothing the fuzzer sent changed an answer (its POSTs start batch runs, which publish
    // versions of the same events).
    truth.check(&addr);
    truth.check_insights(&addr);

    // strata verify, over plain HTTP and over HTTPS, both with the read key set.
    common.extend(["--admin-key".into(), ADMIN_KEY.into()]);
    let (code, text) = verify(&common, &addr, true, &[]);
    assert_eq!(code, 0, "{text}");

    let pki = dir.join("pki");
    make_ca(&pki);
    sign_cert(
        &pki,
        "server",
        "127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    );
    let tls_addr = format!("127.0.0.1:{}", free_port());
    let mut serve_args = vec!["serve".to_string()];
    serve_args.extend_from_slice(&common);
    serve_args.extend([
        "--http".into(),
        tls_addr.clone(),
        "--read-key".into(),
        READ_KEY.into(),
        "--tls-cert".into(),
        pki.join("server.pem").to_str().expect("utf-8").into(),
        "--tls-key".into(),
        pki.join("server.key").to_str().expect("utf-8").into(),
    ]);
    let mut serve = Proc::spawn("serve-tls", &serve_args, dir);
    let ca = pki.join("ca.pem");
    let ca = ca.to_str().expect("utf-8");
    let url = format!("https://{tls_addr}");
    let https = wait_for("verify over HTTPS", Duration::from_secs(60), || {
        let (code, text) = verify_url(&common, &url, true, &["--ca-cert", ca]);
        // 2 while the server is still starting (connection refused); anything else is final.
        (!text.contains("connecting to the serving layer")).then_some((code, text))
    });
    assert_eq!(https.0, 0, "{}", https.1);
    assert!(
        verify_summary(&https.1).contains("0 differences"),
        "{}",
        https.1
    );

    // Without the CA, the chain is not trusted: a clear error, exit 2.
    let (code, text) = verify_url(&common, &url, false, &[]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("UnknownIssuer") || text.contains("certificate"),
        "{text}"
    );

    serve.terminate();
    up.terminate();
}
