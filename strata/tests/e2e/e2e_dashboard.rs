//! The live dashboard at `/`, driven in headless Chromium: `strata up` on a fresh topic, a seeded
//! stream with planted patterns, a batch run, then `tests/dashboard/check.mjs` (playwright-core
//! and Debian's /usr/bin/chromium, both installed by scripts/deps.sh) reads what the page shows.
//! It must equal the API's own answers fetched at about the same time, and those the ground truth.
//! The screenshot goes to `$STRATA_ARTIFACTS/dashboard.png`, by default
//! `<CARGO_TARGET_DIR or target>/artifacts/dashboard.png`.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::Value;
use strata_common::time::now_millis;

const MINUTE: i64 = 60_000;
const CHROMIUM: &str = "/usr/bin/chromium";

/// Where playwright-core is installed: `$STRATA_NODE_MODULES`, by default where scripts/deps.sh
/// puts it.
fn node_modules() -> PathBuf {
    std::env::var_os("STRATA_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/strata/tools/node/node_modules")
        })
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn artifacts_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STRATA_ARTIFACTS") {
        return PathBuf::from(d);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                workspace_root().join(t)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("artifacts")
}

/// Runs check.mjs against `url` (two minutes at most) and returns the JSON it prints.
fn run_check(url: &str, screenshot: &Path, work: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard/check.mjs");
    let profile = work.join("chromium-profile");
    std::fs::create_dir_all(&profile).expect("profile directory");
    let (out_path, err_path) = (work.join("check.out"), work.join("check.err"));
    let mut child = Command::new("node")
        .arg(&script)
        .arg(url)
        .arg(screenshot)
        .arg(&profile)
        .env("STRATA_NODE_MODULES", node_modules())
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run node ({e}); scripts/deps.sh installs it"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "check.mjs did not finish in 2 minutes: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(
        status.success(),
        "check.mjs exited with {status}:\n{}\n{out}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    let last = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("check.mjs printed no JSON ({e}): {out}"))
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["item"].as_str().or(x["device"].as_str()))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn dashboard_shows_what_the_api_answers() {
    let started = Instant::now();
    let modules = node_modules();
    assert!(
        modules.join("playwright-core/package.json").is_file(),
        "playwright-core is not in {} (set STRATA_NODE_MODULES, or run scripts/deps.sh)",
        modules.display()
    );
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: scripts/deps.sh installs Debian's chromium"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique_topic("e2e-dashboard");
    let addr = format!("127.0.0.1:{}", free_port());
    let data_dir = dir.path().join("data");
    let common = layer_args(&topic, &data_dir, 5000, None);
    let up_args = up_args(&common, &addr, ADMIN_KEY);
    let mut up = Proc::spawn("up", &up_args, dir.path());
    wait_http(&addr);

    // Five hours of history (the baseline trending compares with), then the last hour with the
    // planted patterns, its event times running to 2 minutes ahead: a stream still arriving, so
    // the last full minute has events while the page is read.
    let mut truth = Truth::default();
    let now = now_millis();
    truth.produce(
        &common,
        gen_config(30, 30_000, now - 6 * 60 * MINUTE, 5 * 60 * MINUTE, false),
    );
    truth.produce(
        &common,
        gen_config(31, 30_000, now - 58 * MINUTE, 60 * MINUTE, true),
    );
    wait_speed_offsets(&addr, truth.messages);
    let st = run_batch(&addr, ADMIN_KEY, 0);
    let version = st["batch"]["version"].as_u64().expect("a batch version");
    truth.check(&addr);
    truth.check_patterns(&addr);

    let artifacts = artifacts_dir();
    std::fs::create_dir_all(&artifacts).expect("artifacts directory");
    let screenshot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let page = run_check(&format!("http://{addr}/"), &screenshot, dir.path());

    // The API's answers, at about the same time.
    let (_, top) = get_json(
        &addr,
        "/v1/insights/top-items?type=purchase&window=all&limit=10",
    );
    let (_, fleet) = get_json(&addr, "/v1/devices/health");
    let (_, trending) = get_json(&addr, "/v1/insights/trending?limit=10");
    let (_, recs) = get_json(&addr, "/v1/recommendations/items/p-a");
    let (_, user_recs) = get_json(&addr, "/v1/recommendations/users/u1");
    let (missing_status, missing) = get_json(&addr, "/v1/recommendations/items/no-such-item");
    let (_, status) = get_json(&addr, "/v1/status");

    let problems = strings(&page["problems"]);
    assert!(problems.is_empty(), "the page had errors: {problems:#?}");
    assert_eq!(
        page["content_type"], "text/html; charset=utf-8",
        "{}",
        page["content_type"]
    );

    // Top items: the same items in the same order with the same counts.
    let shown_top: Vec<(String, u64)> = page["top_items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    (
                        x["item"].as_str().unwrap_or("").to_string(),
                        x["count"].as_u64().unwrap_or(u64::MAX),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let api_top = item_counts(&top["items"]);
    assert!(!api_top.is_empty(), "no top items: {top}");
    assert_eq!(shown_top, api_top, "top items on the page vs the API");

    // Fleet: the same status; the devices listed as late or silent are the API's.
    let fleet_status = fleet["status"].as_str().unwrap_or("");
    assert_eq!(page["fleet"]["status"], fleet_status, "{}", page["fleet"]);
    let headline = page["fleet"]["text"].as_str().unwrap_or("");
    if fleet_status == "ok" {
        assert!(headline.contains("Everything is OK"), "{headline}");
    } else {
        assert!(!headline.contains("Everything is OK"), "{headline}");
    }
    let listed = |v: &Value, late: &str, silent: &str, f: fn(&Value) -> Vec<String>| {
        f(&v[late])
            .into_iter()
            .chain(f(&v[silent]))
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(
        listed(&page["fleet"], "late", "silent", strings),
        listed(&fleet, "late", "silent", names),
        "devices needing attention: page {} vs API {fleet}",
        page["fleet"]
    );
    assert!(
        strings(&page["fleet"]["silent"]).contains(&"p-quiet".to_string()),
        "the planted silent device: {}",
        page["fleet"]
    );

    // Events per second: the chart is the API's minute series, and the figure is the last full
    // minute's count / 60.
    let series = page["events"]["series"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(series.len(), 60, "minutes on the chart");
    let (Some(from), Some(to)) = (
        series.first().and_then(|p| p["start"].as_str()),
        series.last().and_then(|p| p["start"].as_str()),
    ) else {
        panic!("the chart's bars carry no start: {}", page["events"]);
    };
    let (_, api_series) = get_json(
        &addr,
        &format!("/v1/insights/timeseries?metric=events&bucket=minute&from={from}&to={to}"),
    );
    let shown_points: Vec<(String, f64)> = series
        .iter()
        .map(|p| {
            (
                p["start"].as_str().unwrap_or("").to_string(),
                p["value"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    let api_points: Vec<(String, f64)> = api_series["points"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["start"].as_str().unwrap_or("").to_string(),
                        p["value"].as_f64().unwrap_or(f64::NAN),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(shown_points, api_points, "the events chart vs the API");
    let last_full = &shown_points[shown_points.len() - 2];
    assert_eq!(page["events"]["minute"], last_full.0.as_str());
    assert_eq!(page["events"]["count"].as_f64(), Some(last_full.1));
    assert!(last_full.1 > 0.0, "the last full minute has events");
    let per_second: f64 = page["events"]["per_second"]
        .as_str()
        .and_then(|s| s.replace(',', "").parse().ok())
        .unwrap_or(f64::NAN);
    assert!(
        (per_second - last_full.1 / 60.0).abs() <= 0.051,
        "events/s shown {per_second} vs {} / 60",
        last_full.1
    );

    // Trending: the planted item leads on the page as in the API.
    let shown_trending = strings(&page["trending"]);
    assert_eq!(
        shown_trending.first(),
        names(&trending["items"]).first(),
        "{trending}"
    );
    assert_eq!(shown_trending.first().map(String::as_str), Some("p-hot"));

    // Freshness: the batch version just published and the speed layer's age.
    let fresh = &page["freshness"];
    assert_eq!(fresh["batch_version"], version.to_string(), "{fresh}");
    assert_eq!(
        fresh["published_at"], status["batch"]["published_at"],
        "{fresh}"
    );
    assert!(
        fresh["text"]
            .as_str()
            .is_some_and(|t| t.contains(&format!("v{version}")) && t.contains("speed layer")),
        "{fresh}"
    );
    assert!(
        fresh["speed_age_ms"]
            .as_str()
            .is_some_and(|s| s.parse::<i64>().is_ok()),
        "{fresh}"
    );

    // Recommendations for p-a typed into the form: the API's list, p-b first (planted).
    let shown_recs = strings(&page["recommendations"]["items"]);
    assert_eq!(shown_recs, names(&recs["items"]), "{recs}");
    assert_eq!(shown_recs.first().map(String::as_str), Some("p-b"));
    assert_eq!(
        strings(&page["user_recommendations"]),
        names(&user_recs["items"]),
        "{user_recs}"
    );

    // An unknown item: the API's 404 message, and no list.
    assert_eq!(missing_status, 404);
    assert_eq!(page["rec_error"]["status"], "404", "{}", page["rec_error"]);
    assert_eq!(
        page["rec_error"]["text"], missing["error"]["message"],
        "{}",
        page["rec_error"]
    );
    assert_eq!(page["rec_error"]["items"], 0);

    let size = std::fs::metadata(&screenshot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "screenshot {} is {size} bytes",
        screenshot.display()
    );
    up.assert_running();
    eprintln!(
        "e2e_dashboard: {} messages, top items {:?}, fleet {fleet_status}, p-a -> {:?}; screenshot {}; {:.1}s",
        truth.messages,
        &api_top[..api_top.len().min(3)],
        &shown_recs[..shown_recs.len().min(3)],
        screenshot.display(),
        started.elapsed().as_secs_f64()
    );
    println!("screenshot: {}", screenshot.display());
}
