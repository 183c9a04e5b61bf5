//! One HTTP request per input through the serving layer's routes, in process (`warp::test`), the
//! way serving-layer/tests/routes.rs builds them: a batch version published once into a temporary
//! directory (folded from a few dozen real events around the current time, so windows, series,
//! recommendations and device windows have data), `ServingState::following`, `api::routes`.
//!
//! Input layout: byte 0 picks the method, byte 1 a route template, the rest (UTF-8, else the input
//! is skipped) is split on `\n` into the template's holes; for POST/PUT/PATCH a third part is the
//! body. Inputs that do not make a valid URI for `warp::test` are skipped.
//!
//! Checked: no panic, the status is never 5xx, and the body is always valid JSON, except for the
//! two answers the API documents as something else: `GET /` (the dashboard, HTML) and
//! `GET /metrics` (Prometheus text). The configuration is the default one plus an admin key, as
//! in the route tests: no read key, no CORS origins, and no request carries `authorization`.

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use strata_common::batch_store::{self, Manifest};
use strata_common::config::Config;
use strata_common::event::{decode, Rules};
use strata_common::handoff::Offsets;
use strata_common::time::{format_rfc3339, now_millis};
use strata_common::views::ViewSet;
use strata_serving::api::routes;
use strata_serving::app::App;
use strata_serving::ServingState;

const KEY: &str = "fuzz-admin-key";

/// Route templates; `{0}` and `{1}` are filled from the input. Byte 1 of an input picks one
/// modulo 32, so the seeds spell the first 16 as `@`, `A`, ..., `O` and the rest as `P`, ..., `_`;
/// the second half repeats the query routes to give them more weight.
const TEMPLATES: [&str; 32] = [
    "/v1/items/{0}",
    "/v1/insights/top-items?{0}",
    "/v1/insights/trending?{0}",
    "/v1/insights/timeseries?{0}",
    "/v1/recommendations/items/{0}?{1}",
    "/v1/recommendations/users/{0}?{1}",
    "/v1/devices/{0}/health?{1}",
    "/v1/devices/health{0}",
    "/v1/status{0}",
    "/readyz{0}",
    "/healthz{0}",
    "/v1/admin/batch{0}",
    "/v1/admin/{0}",
    "/v1/insights/{0}?{1}",
    "/v1/{0}",
    "{0}",
    "/metrics{0}",
    "/v1/openapi.json{0}",
    "/v1/admin/batch/{0}",
    "/v1/admin/views{0}",
    "/{0}",
    "/v1/items/{0}?{1}",
    "/v1/insights/top-items?{0}",
    "/v1/insights/trending?{0}",
    "/v1/insights/timeseries?{0}",
    "/v1/recommendations/items/{0}?{1}",
    "/v1/recommendations/users/{0}?{1}",
    "/v1/devices/{0}/health?{1}",
    "/v1/insights/timeseries?{0}&{1}",
    "/v1/insights/top-items?{0}&{1}",
    "/v1/insights/trending?{0}&{1}",
    "/v1/recommendations/{0}/{1}",
];

const OTHER_METHODS: [&str; 5] = ["PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"];

struct Fixture {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    state: Arc<App>,
}

fn events(now: i64) -> Vec<String> {
    let min = 60_000;
    let at = |ago: i64| format_rfc3339(now - ago);
    let mut out = Vec::new();
    let items = [
        ("i1", "books"),
        ("i2", "books"),
        ("i3", "toys"),
        ("p-hot", "toys"),
    ];
    let users = ["u1", "u2", "u3", "u4"];
    let mut n = 0;
    for (ui, user) in users.iter().enumerate() {
        for (ii, (item, cat)) in items.iter().enumerate() {
            // Recent and old events, so windows (1h, 24h, 7d) and baselines differ.
            for ago in [5 * min, 90 * min, 3 * 24 * 60 * min] {
                n += 1;
                out.push(format!(
                    r#"{{"id":"e{n}","ts":"{}","type":"view","user":"{user}","item":"{item}","category":"{cat}"}}"#,
                    at(ago + (ui * 7 + ii) as i64 * 1000)
                ));
            }
            if (ui + ii) % 2 == 0 {
                n += 1;
                out.push(format!(
                    r#"{{"id":"e{n}","ts":"{}","type":"add_to_cart","user":"{user}","item":"{item}"}}"#,
                    at(20 * min)
                ));
                n += 1;
                out.push(format!(
                    r#"{{"id":"e{n}","ts":"{}","type":"purchase","user":"{user}","item":"{item}","category":"{cat}","qty":{},"price":12.5}}"#,
                    at(15 * min),
                    ui + 1
                ));
            }
            n += 1;
            out.push(format!(
                r#"{{"id":"e{n}","ts":{},"type":"rating","user":"{user}","item":"{item}","rating":{}}}"#,
                now - 30 * min,
                (ui + ii) % 5 + 1
            ));
        }
    }
    for (d, value) in [("d1", 21.5), ("d2", 95.0), ("p-quiet", -3.0)] {
        for ago in [30_000, 70 * min, 26 * 60 * min] {
            n += 1;
            out.push(format!(
                r#"{{"id":"e{n}","ts":"{}","type":"reading","device":"{d}","metric":"temp_c","value":{value}}}"#,
                at(ago)
            ));
            n += 1;
            out.push(format!(
                r#"{{"id":"e{n}","ts":"{}","type":"heartbeat","device":"{d}"}}"#,
                at(ago)
            ));
        }
    }
    out
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = Rules::default();
        let mut views = ViewSet::default();
        let now = now_millis();
        let mut count = 0;
        for line in events(now) {
            let e = decode(line.as_bytes(), None, &rules).expect("fixture events are valid");
            views.fold(&e);
            count += 1;
        }
        let mut cfg = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        cfg.serve.admin_key = Some(KEY.into());
        batch_store::publish(
            dir.path(),
            &views,
            Manifest {
                version: 0,
                published_at: format_rfc3339(now),
                block_size: cfg.handoff.block_size,
                cutoffs: Offsets::from([(0, 10_000)]),
                events: count,
                duplicates: 0,
                keys: 0,
                duration_ms: 1,
                // Minute buckets left out by retention, so that the 410 answers are reached too.
                retention: strata_common::retention::Marks {
                    series_minute_from: Some(now - 3 * 86_400_000),
                    item_minute_from: Some(now - 10 * 86_400_000),
                },
                ..Manifest::default()
            },
        )
        .expect("publish");
        let state = Arc::new(App::new(Arc::new(ServingState::following(cfg))));
        // As if the background probe had reached the broker: /readyz answers 200, not 503.
        state.broker_probed(Ok(Offsets::from([(0, 10_000)])));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Fixture {
            _dir: dir,
            rt,
            state,
        }
    })
}

/// `STRATA_FUZZ_DEBUG=1` prints every request and answer (to see what a corpus reaches).
fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("STRATA_FUZZ_DEBUG").is_some_and(|v| v == "1"))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let method = match data[0] % 8 {
        0..=4 => "GET",
        5 => "POST",
        m => OTHER_METHODS[(usize::from(data[0] / 8) + usize::from(m)) % OTHER_METHODS.len()],
    };
    let template = TEMPLATES[usize::from(data[1]) % TEMPLATES.len()];
    let Ok(rest) = std::str::from_utf8(&data[2..]) else {
        return;
    };
    let mut parts = rest.splitn(3, '\n');
    let a = parts.next().unwrap_or("");
    let b = parts.next().unwrap_or("");
    let body = parts.next();
    let path = template.replace("{0}", a).replace("{1}", b);
    // Only what warp::test accepts (it panics on anything else): an origin-form URI.
    if !path.starts_with('/') {
        return;
    }
    let uri = match path.parse::<warp::http::Uri>() {
        Ok(uri) if uri.scheme().is_none() && uri.authority().is_none() => uri,
        _ => return,
    };

    let fx = fixture();
    let mut req = warp::test::request().method(method).path(&path);
    if let (Some(body), "POST" | "PUT" | "PATCH") = (body, method) {
        req = req.body(body);
    }
    let api = routes(fx.state.clone());
    let res = fx.rt.block_on(req.reply(&api));
    let status = res.status();
    let body = res.body();
    if debug() {
        let shown: String = String::from_utf8_lossy(body).chars().take(300).collect();
        eprintln!("{method} {path} -> {status} {shown}");
    }
    assert!(
        !status.is_server_error(),
        "{method} {path} answered {status}: {}",
        String::from_utf8_lossy(body)
    );
    // The two answers documented as not JSON: the dashboard page and the Prometheus metrics.
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // (warp routes `/metrics/` like `/metrics`.)
    let route = uri.path().trim_end_matches('/');
    let not_json = status.is_success()
        && method == "GET"
        && ((route.is_empty() && content_type.starts_with("text/html"))
            || (route == "/metrics" && content_type.starts_with("text/plain")));
    if not_json {
        return;
    }
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(body) {
        panic!(
            "{method} {path} answered {status} with a body that is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        );
    }
});
