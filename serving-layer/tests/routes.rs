//! The routes over real HTTP on a loopback port, over a published batch version and no speed
//! state.

use std::sync::Arc;

use serde_json::Value;
use strata_common::batch_store::{self, Manifest};
use strata_common::config::Config;
use strata_common::handoff::Offsets;
use strata_common::views::{DeviceStats, ItemStats, Partial, ViewKey, ViewSet};
use strata_serving::api::routes;
use strata_serving::app::App;
use strata_serving::ServingState;

/// The routes' view of a serving state: the state and what the queries keep.
fn app(state: ServingState) -> Arc<App> {
    Arc::new(App::new(Arc::new(state)))
}

const KEY: &str = "route-test-key";

fn state(dir: &std::path::Path) -> Arc<App> {
    state_with(dir, |_| {})
}

fn state_with(dir: &std::path::Path, tune: impl FnOnce(&mut Config)) -> Arc<App> {
    let mut views = ViewSet::default();
    for (item, purchases) in [("i1", 5), ("i2", 9), ("i3", 0)] {
        views.add(
            ViewKey::Item(item.into()),
            &Partial::Item(ItemStats {
                views: 10,
                purchases,
                quantity: purchases,
                revenue_micros: i128::from(purchases) * 2_500_000,
                ..Default::default()
            }),
        );
    }
    views.add(
        ViewKey::Device("d1".into()),
        &Partial::Device(DeviceStats {
            last_seen: Some(strata_common::time::now_millis()),
            heartbeats: 3,
            readings: 2,
            min: Some(1.0),
            max: Some(3.0),
            sum_micros: 4_000_000,
        }),
    );
    let mut cfg = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    cfg.serve.admin_key = Some(KEY.into());
    tune(&mut cfg);
    batch_store::publish(
        dir,
        &views,
        Manifest {
            version: 0,
            published_at: "2026-11-25T00:00:00.000Z".into(),
            block_size: cfg.handoff.block_size,
            cutoffs: Offsets::from([(0, 10_000)]),
            events: 35,
            duplicates: 0,
            keys: 0,
            duration_ms: 1,
            ..Default::default()
        },
    )
    .expect("publish");
    app(ServingState::following(cfg))
}

/// One HTTP response as it came over the wire.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Serves `state`'s routes on a fresh loopback port and sends one HTTP/1.1 request to it over
/// TCP (`Connection: close`); the server task ends with the test's runtime.
async fn send(
    state: &Arc<App>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(warp::serve(routes(state.clone())).incoming(listener).run());
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    // A server that refuses a request early may close before reading all of it: what it
    // answered is still read below.
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body).await;
    let mut raw = Vec::new();
    let _ = conn.read_to_end(&mut raw).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

/// The body of a `Transfer-Encoding: chunked` response.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            panic!("a chunk without its size line");
        };
        let size_text = String::from_utf8_lossy(&raw[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("a bad chunk size {size_text:?}"));
        raw = &raw[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

async fn call(state: &Arc<App>, method: &str, path: &str, auth: Option<&str>) -> (u16, Value) {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
    let res = send(state, method, path, &headers, b"").await;
    let body: Value = serde_json::from_slice(&res.body).expect("every answer is JSON");
    (res.status, body)
}

/// Publishes `views` as the next batch version, covering partition 0 below one block.
fn publish_views(cfg: &Config, views: &ViewSet, events: u64) {
    let block_size = cfg.handoff.block_size;
    batch_store::publish(
        &cfg.data_dir,
        views,
        Manifest {
            version: 0,
            published_at: "2026-11-25T00:00:00.000Z".into(),
            block_size,
            cutoffs: Offsets::from([(0, block_size as i64)]),
            events,
            duplicates: 0,
            keys: 0,
            duration_ms: 1,
            ..Default::default()
        },
    )
    .expect("publish");
}

/// A speed state past the batch's cutoff: partition 0 consumed 50 offsets into block 1. The
/// caller writes the blocks' values.
fn speed_past_the_batch(cfg: &Config) -> Arc<rocksdb::DB> {
    use strata_common::speed_store::{self, encode_i64, meta_key, Cf};
    let block_size = cfg.handoff.block_size as i64;
    let db = Arc::new(speed_store::open_primary(&cfg.speed_dir()).expect("open speed state"));
    let meta = speed_store::cf(&db, Cf::Meta).expect("cf");
    db.put_cf(meta, meta_key::BLOCK_SIZE, encode_i64(block_size))
        .expect("put");
    db.put_cf(meta, meta_key::next_offset(0), encode_i64(block_size + 50))
        .expect("put");
    db
}

#[tokio::test]
async fn answers_from_the_batch_version_with_as_of() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = state(dir.path());
    let (status, v) = call(&s, "GET", "/v1/items/i2", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["counts"]["purchase"], 9);
    assert_eq!(v["revenue"], 22.5);
    assert_eq!(v["as_of"]["batch"]["version"], 1);
    assert_eq!(v["as_of"]["coverage"]["0"], 10_000);

    let (status, v) = call(
        &s,
        "GET",
        "/v1/insights/top-items?type=purchase&limit=5",
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let items: Vec<&str> = v["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["item"].as_str())
        .collect();
    assert_eq!(items, ["i2", "i1"], "zero counts are left out");

    let (status, v) = call(&s, "GET", "/v1/devices/d1/health", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "ok");
    assert_eq!(v["readings"]["mean"], 2.0);
}

#[tokio::test]
async fn fleet_and_fallback_recommendations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = state(dir.path());
    let (status, v) = call(&s, "GET", "/v1/devices/health", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "ok");
    assert_eq!(v["counts"]["ok"], 1);
    let (status, v) = call(
        &s,
        "GET",
        "/v1/recommendations/users/new-user?limit=2",
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["source"], "top_items");
    assert_eq!(v["items"][0]["item"], "i2");
    let (status, v) = call(&s, "GET", "/v1/insights/timeseries?metric=events", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["points"].as_array().map(Vec::len), Some(60));
}

#[tokio::test]
async fn bad_requests_get_json_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = state(dir.path());
    for (method, path, want) in [
        ("GET", "/v1/items/nope", 404),
        ("GET", "/v1/devices/nope/health", 404),
        ("GET", "/v1/insights/top-items?limit=0", 400),
        ("GET", "/v1/insights/top-items?limit=100000", 400),
        ("GET", "/v1/insights/top-items?type=teleport", 400),
        ("GET", "/v1/items/bad%zz", 400),
        ("GET", "/no/such/route", 404),
        ("GET", "/v1/insights/top-items?window=2h", 400),
        ("GET", "/v1/insights/trending?window=7d&baseline=1h", 400),
        ("GET", "/v1/insights/trending?min_support=0", 400),
        ("GET", "/v1/insights/timeseries?bucket=week", 400),
        ("GET", "/v1/insights/timeseries?metric=bogus", 400),
        ("GET", "/v1/insights/timeseries?from=yesterday", 400),
        (
            "GET",
            "/v1/insights/timeseries?bucket=minute&from=2000-01-01T00:00:00Z",
            400,
        ),
        (
            "GET",
            "/v1/insights/timeseries?metric=distinct_users&item=i1&bucket=hour",
            400,
        ),
        ("GET", "/v1/insights/timeseries?type=teleport", 400),
        ("GET", "/v1/recommendations/items/i1?basis=cart", 400),
        ("GET", "/v1/recommendations/items/nope", 404),
        ("GET", "/v1/devices/d1/health?hours=0", 400),
        ("DELETE", "/v1/status", 405),
        ("PUT", "/v1/items/i1", 405),
        ("GET", "/v1/items/%ff%fe", 400),
        (
            "GET",
            "/v1/insights/top-items?limit=99999999999999999999999",
            400,
        ),
        (
            "GET",
            "/v1/insights/timeseries?from=9999999-01-01T00:00:00Z",
            400,
        ),
    ] {
        let (status, v) = call(&s, method, path, None).await;
        assert_eq!(status, want, "{method} {path}: {v}");
        assert!(v["error"]["message"].is_string(), "{method} {path}: {v}");
    }
}

#[tokio::test]
async fn identifiers_longer_than_any_event_may_carry_are_400() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = state(dir.path());
    let max = Config::default().validation.max_id_bytes;
    let long = "x".repeat(max + 1);
    for path in [
        format!("/v1/items/{long}"),
        format!("/v1/recommendations/users/{long}"),
        format!("/v1/devices/{long}/health"),
        format!("/v1/insights/top-items?category={long}"),
        format!("/v1/insights/timeseries?item={long}"),
    ] {
        let (status, v) = call(&s, "GET", &path, None).await;
        assert_eq!(status, 400, "{path}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("1 to {max} characters"))),
            "{v}"
        );
    }
    // The longest allowed is looked up (and not found).
    let (status, v) = call(&s, "GET", &format!("/v1/items/{}", "x".repeat(max)), None).await;
    assert_eq!(status, 404, "{v}");
}

#[tokio::test]
async fn a_405_names_the_methods_its_path_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = state(dir.path());
    for (method, path, allow) in [
        ("DELETE", "/v1/status", "GET"),
        ("PUT", "/v1/items/i1", "GET"),
        ("GET", "/v1/admin/batch", "POST"),
        ("POST", "/v1/admin/batch/r1", "GET"),
        ("POST", "/metrics", "GET"),
    ] {
        let res = send(&s, method, path, &[], b"").await;
        assert_eq!(res.status, 405, "{method} {path}: {}", res.text());
        assert_eq!(res.header("allow"), Some(allow), "{method} {path}");
    }
    // A method on a path no route has is a 404, not a 405 with nothing allowed.
    let res = send(&s, "POST", "/no/such/route", &[], b"").await;
    assert_eq!(res.status, 404, "{}", res.text());
    assert_eq!(res.header("allow"), None);
}

#[tokio::test]
async fn admin_needs_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = state(dir.path());
    assert_eq!(call(&s, "POST", "/v1/admin/batch", None).await.0, 401);
    assert_eq!(
        call(&s, "POST", "/v1/admin/batch", Some("Bearer wrong-key"))
            .await
            .0,
        401
    );
    let (status, v) = call(
        &s,
        "POST",
        "/v1/admin/batch",
        Some(&format!("Bearer {KEY}")),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let id = v["run_id"].as_str().expect("run id");
    assert_eq!(
        batch_store::take_requests(dir.path()).expect("requests"),
        vec![id.to_string()]
    );
}

#[tokio::test]
async fn long_urls_and_large_bodies_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = state(dir.path());
    let long = format!("/v1/items/{}", "x".repeat(10_000));
    let (status, v) = call(&s, "GET", &long, None).await;
    assert_eq!(status, 414, "{v}");
    assert_eq!(v["error"]["code"], "url_too_long");
    let long_query = format!("/v1/insights/top-items?category={}", "c".repeat(9_000));
    assert_eq!(call(&s, "GET", &long_query, None).await.0, 414);

    let bearer = format!("Bearer {KEY}");
    let res = send(
        &s,
        "POST",
        "/v1/admin/batch",
        &[("authorization", &bearer)],
        &vec![b'x'; 100_000],
    )
    .await;
    assert_eq!(res.status, 413);
    let v: Value = serde_json::from_slice(&res.body).expect("JSON");
    assert_eq!(v["error"]["code"], "too_large", "{v}");
    assert!(
        batch_store::take_requests(dir.path())
            .expect("requests")
            .is_empty(),
        "a refused request must not start a run"
    );
}

#[tokio::test]
async fn readyz_needs_views_and_the_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = state(dir.path());
    let (status, v) = call(&s, "GET", "/readyz", None).await;
    assert_eq!(status, 503, "no broker probed yet: {v}");
    s.broker_probed(Ok(Offsets::from([(0, 10)])));
    assert_eq!(call(&s, "GET", "/readyz", None).await.0, 200);
    s.broker_probed(Err("connection refused".into()));
    let (status, v) = call(&s, "GET", "/readyz", None).await;
    assert_eq!(status, 503);
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("unreachable since"), "{msg}");
    let (status, v) = call(&s, "GET", "/v1/status", None).await;
    assert_eq!(status, 200, "answers go on during the outage: {v}");
    assert_eq!(v["broker"]["reachable"], false);
    assert!(v["broker"]["unreachable_since"].is_string(), "{v}");
    assert_eq!(call(&s, "GET", "/v1/items/i2", None).await.0, 200);
    s.broker_probed(Ok(Offsets::from([(0, 10)])));
    assert_eq!(call(&s, "GET", "/readyz", None).await.0, 200);
}

#[tokio::test]
async fn views_snapshot_is_for_admins_and_holds_every_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = state(dir.path());
    assert_eq!(call(&s, "GET", "/v1/admin/views", None).await.0, 401);
    let bearer = format!("Bearer {KEY}");
    let res = send(
        &s,
        "GET",
        "/v1/admin/views",
        &[("authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(res.status, 200);
    let snap = strata_common::views::Snapshot::decode(&res.body).expect("postcard snapshot");
    assert!(snap.batch_version.is_some());
    assert_eq!(snap.coverage, Offsets::from([(0, 10_000)]));
    assert_eq!(snap.entries.len(), 4, "three items and one device");
    assert!(snap
        .entries
        .iter()
        .any(|(k, _)| *k == ViewKey::Device("d1".into())));
}

#[tokio::test]
async fn openapi_lists_exactly_the_routes_and_every_one_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = state(dir.path());
    let (status, doc) = call(&s, "GET", "/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    let mut documented = std::collections::BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for method in ops.as_object().expect("operations").keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let routes: std::collections::BTreeSet<(String, String)> = strata_serving::metrics::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        documented, routes,
        "the OpenAPI document and the routes differ"
    );
    for (method, template) in &routes {
        let path = template
            .split('/')
            .map(|seg| if seg.starts_with('{') { "x" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        let bearer = format!("Bearer {KEY}");
        let res = send(&s, method, &path, &[("authorization", &bearer)], b"").await;
        let body = res.text();
        assert!(
            !body.contains("no such route") && res.status != 405,
            "{method} {path} is documented but not served: {} {body}",
            res.status
        );
    }
}

#[tokio::test]
async fn metrics_describe_the_layers_and_the_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = state(dir.path());
    s.broker_probed(Ok(Offsets::from([(0, 10_000)])));
    for path in ["/v1/items/i1", "/v1/items/i2", "/v1/items/nope", "/no/such"] {
        call(&s, "GET", path, None).await;
    }
    let res = send(&s, "GET", "/metrics", &[], b"").await;
    assert_eq!(res.status, 200);
    let text = res.text();
    for line in [
        "strata_broker_up 1",
        "strata_batch_events 35",
        "strata_http_requests_total{route=\"/v1/items/{item}\",code=\"2xx\"} 2",
        "strata_http_requests_total{route=\"/v1/items/{item}\",code=\"4xx\"} 1",
        "strata_http_requests_total{route=\"other\",code=\"4xx\"} 1",
        "strata_http_request_duration_seconds_count{route=\"/v1/items/{item}\"} 3",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(text.contains("# TYPE strata_http_request_duration_seconds histogram"));
    assert!(text
        .lines()
        .any(|l| l.starts_with("strata_batch_versions_bytes ") && !l.ends_with(" 0")));
}

#[tokio::test]
async fn batch_runs_are_tracked_by_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = state(dir.path());
    let auth = format!("Bearer {KEY}");
    let (status, v) = call(&s, "POST", "/v1/admin/batch", Some(&auth)).await;
    assert_eq!(status, 202, "{v}");
    let id = v["run_id"].as_str().expect("run id").to_string();
    let (status, run) = call(&s, "GET", &format!("/v1/admin/batch/{id}"), Some(&auth)).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["state"], "requested");
    assert_eq!(run["trigger"], "request");
    assert!(run["requested_at"].is_string());
    assert_eq!(
        call(&s, "GET", &format!("/v1/admin/batch/{id}"), None)
            .await
            .0,
        401
    );
    assert_eq!(
        call(&s, "GET", "/v1/admin/batch/run-0-0000", Some(&auth))
            .await
            .0,
        404
    );
    assert_eq!(
        call(&s, "GET", "/v1/admin/batch/..%2F..%2Fetc", Some(&auth))
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn a_read_key_guards_the_read_routes_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = state_with(dir.path(), |c| c.serve.read_key = Some("reader-key".into()));
    let (status, v) = call(&s, "GET", "/v1/items/i2", None).await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(
        call(&s, "GET", "/v1/items/i2", Some("Bearer wrong-key"))
            .await
            .0,
        401
    );
    assert_eq!(
        call(&s, "GET", "/v1/items/i2", Some("Bearer reader-key"))
            .await
            .0,
        200
    );
    assert_eq!(
        call(&s, "GET", "/v1/items/i2", Some(&format!("Bearer {KEY}")))
            .await
            .0,
        200,
        "the admin key reads too"
    );
    for open in ["/healthz", "/v1/openapi.json"] {
        assert_eq!(call(&s, "GET", open, None).await.0, 200, "{open}");
    }
    // The admin route still wants the admin key, not the read key.
    assert_eq!(
        call(&s, "POST", "/v1/admin/batch", Some("Bearer reader-key"))
            .await
            .0,
        401
    );
}

#[tokio::test]
async fn cors_headers_go_to_allowed_origins_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = state_with(dir.path(), |c| {
        c.serve.cors_origins = vec!["https://app.example.com".into()]
    });
    let res = send(
        &s,
        "GET",
        "/v1/items/i2",
        &[("origin", "https://app.example.com")],
        b"",
    )
    .await;
    assert_eq!(res.status, 200);
    assert_eq!(
        res.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    let res = send(
        &s,
        "GET",
        "/v1/items/i2",
        &[("origin", "https://evil.example.com")],
        b"",
    )
    .await;
    assert!(res.header("access-control-allow-origin").is_none());
    let res = send(
        &s,
        "OPTIONS",
        "/v1/items/i2",
        &[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "authorization"),
        ],
        b"",
    )
    .await;
    assert_eq!(res.status, 204);
    let allow = res
        .header("access-control-allow-headers")
        .unwrap_or_default();
    assert!(allow.contains("authorization"), "{allow}");
}

/// Windowed top items merge the batch version's buckets inside the window with the speed
/// layer's, and leave out both sides' buckets before it.
#[tokio::test]
async fn windowed_top_items_merge_batch_and_speed_buckets_inside_the_window() {
    use strata_common::speed_store::{self, block_key, Cf, SpeedReader};
    use strata_common::views::Gran;

    let dir = tempfile::tempdir().expect("tempdir");
    let hour = Gran::Hour.floor(strata_common::time::now_millis());
    let series = |start, item: &str| ViewKey::ItemSeries {
        gran: Gran::Hour,
        start,
        item: item.into(),
    };
    let bought = |purchases| {
        Partial::Item(ItemStats {
            purchases,
            ..Default::default()
        })
    };
    let mut views = ViewSet::default();
    views.add(series(hour - 2 * 3_600_000, "i1"), &bought(2));
    views.add(series(hour - 30 * 3_600_000, "i1"), &bought(100));
    views.add(series(hour - 3_600_000, "i2"), &bought(1));
    let mut cfg = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    // Computed every time: the second query must take the batch's share from its kept totals.
    cfg.serve.answer_cache = 0;
    publish_views(&cfg, &views, 103);

    let db = speed_past_the_batch(&cfg);
    let blocks = speed_store::cf(&db, Cf::Blocks).expect("cf");
    for (key, purchases) in [
        (series(hour, "i1"), 3),
        (series(hour, "i3"), 5),
        (series(hour - 30 * 3_600_000, "i2"), 50),
    ] {
        db.put_cf(blocks, block_key(0, 1, &key), bought(purchases).encode())
            .expect("put");
    }
    let s = app(ServingState::shared(cfg, SpeedReader::shared(db)));
    s.refresh_batch().expect("load the batch version");

    for _ in 0..2 {
        // The second time the batch's share comes from the version's kept totals.
        let (status, v) = call(
            &s,
            "GET",
            "/v1/insights/top-items?type=purchase&window=24h",
            None,
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let items: Vec<(&str, u64)> = v["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter_map(|i| Some((i["item"].as_str()?, i["count"].as_u64()?)))
            .collect();
        assert_eq!(items, [("i1", 5), ("i3", 5), ("i2", 1)]);
    }
    let (status, v) = call(
        &s,
        "GET",
        "/v1/insights/top-items?type=purchase&window=1h",
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(0), "{v}");
}

#[tokio::test]
async fn kept_answers_last_only_while_the_state_stands() {
    use strata_common::speed_store::{self, block_key, Cf, SpeedReader};

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let bought = |purchases| {
        Partial::Item(ItemStats {
            purchases,
            ..Default::default()
        })
    };
    let publish = |purchases| {
        let mut views = ViewSet::default();
        views.add(ViewKey::Item("i1".into()), &bought(purchases));
        publish_views(&cfg, &views, purchases);
    };
    publish(5);
    let db = speed_past_the_batch(&cfg);
    let blocks = speed_store::cf(&db, Cf::Blocks).expect("cf");
    let s = app(ServingState::shared(
        cfg.clone(),
        SpeedReader::shared(db.clone()),
    ));
    s.refresh_batch().expect("load the batch version");
    let purchases = |v: &Value| v["counts"]["purchase"].as_u64();

    // Asked twice with nothing moving, the second answer is the kept one.
    let (_, first) = call(&s, "GET", "/v1/items/i1", None).await;
    assert_eq!(s.answers.counts(), (0, 1));
    let (status, again) = call(&s, "GET", "/v1/items/i1", None).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!((purchases(&first), purchases(&again)), (Some(5), Some(5)));
    assert_eq!(s.answers.counts(), (1, 1));

    // A speed write moves the tag: the next answer includes it.
    db.put_cf(
        blocks,
        block_key(0, 1, &ViewKey::Item("i1".into())),
        bought(3).encode(),
    )
    .expect("put");
    let (_, v) = call(&s, "GET", "/v1/items/i1", None).await;
    assert_eq!(purchases(&v), Some(8), "{v}");

    // So does another batch version.
    publish(20);
    assert!(s.refresh_batch().expect("load"));
    let (_, v) = call(&s, "GET", "/v1/items/i1", None).await;
    assert_eq!(purchases(&v), Some(23), "{v}");
    assert_eq!(v["as_of"]["batch"]["version"], 2);

    // Errors are not kept; the counts are in the metrics.
    let (kept_before, computed_before) = s.answers.counts();
    for _ in 0..2 {
        let (status, _) = call(&s, "GET", "/v1/items/nope", None).await;
        assert_eq!(status, 404);
    }
    assert_eq!(s.answers.counts(), (kept_before, computed_before));
    let text = send(&s, "GET", "/metrics", &[], b"").await.text();
    assert!(
        text.contains(&format!(
            "strata_answers_total{{source=\"kept\"}} {kept_before}"
        )),
        "{text}"
    );
}

/// A configuration over `dir` that computes every answer (none kept), so what a test sees of
/// recommendations is the co-occurrence rows and what is kept of them.
fn computing(dir: &std::path::Path) -> Config {
    let mut cfg = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    cfg.serve.answer_cache = 0;
    cfg
}

/// The key of an item's audience by views.
fn audience(item: &str) -> ViewKey {
    ViewKey::ItemUsers {
        basis: strata_common::views::Basis::View,
        item: item.into(),
    }
}

/// The key of a user's history of views.
fn history(user: &str) -> ViewKey {
    ViewKey::UserItems {
        basis: strata_common::views::Basis::View,
        user: user.into(),
    }
}

#[tokio::test]
async fn recommendations_follow_speed_writes_with_rows_kept_per_state() {
    use std::collections::{BTreeMap, BTreeSet};
    use strata_common::speed_store::{self, block_key, Cf, SpeedReader};
    use strata_common::views::{Name, Recent, Set};

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = computing(dir.path());
    let set = |users: &[&str]| Partial::Set(Set(users.iter().map(|u| Name::from(*u)).collect()));
    let recent = |items: &[(&str, i64)]| {
        Partial::Recent(Recent(
            items.iter().map(|(i, t)| (Name::from(*i), *t)).collect(),
        ))
    };
    let mut views = ViewSet::default();
    views.add(audience("a"), &set(&["u1", "u2"]));
    views.add(audience("b"), &set(&["u1", "u2"]));
    views.add(audience("c"), &set(&["u2"]));
    views.add(history("u1"), &recent(&[("a", 1), ("b", 2)]));
    views.add(history("u2"), &recent(&[("a", 1), ("b", 2), ("c", 3)]));
    publish_views(&cfg, &views, 7);
    let db = speed_past_the_batch(&cfg);
    let blocks = speed_store::cf(&db, Cf::Blocks).expect("cf");
    let s = app(ServingState::shared(cfg, SpeedReader::shared(db.clone())));
    s.refresh_batch().expect("load the batch version");

    let recs = |v: &Value| -> BTreeMap<String, f64> {
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter_map(|i| Some((i["item"].as_str()?.to_owned(), i["score"].as_f64()?)))
            .collect()
    };
    // u1 viewed a and b: each is recommended through the other, and c through both (u2).
    let (status, first) = call(&s, "GET", "/v1/recommendations/users/u1", None).await;
    assert_eq!(status, 200, "{first}");
    let (_, again) = call(&s, "GET", "/v1/recommendations/users/u1", None).await;
    assert_eq!(recs(&first), recs(&again), "kept rows give the same answer");
    let names = |r: &BTreeMap<String, f64>| r.keys().cloned().collect::<BTreeSet<String>>();
    let expect = |items: &[&str]| items.iter().map(|i| i.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(names(&recs(&first)), expect(&["a", "b", "c"]));

    // The speed layer adds: u3 viewed a and d. Rows kept for the old state must not be used.
    for (key, partial) in [
        (audience("a"), set(&["u3"])),
        (audience("d"), set(&["u3"])),
        (history("u3"), recent(&[("a", 4), ("d", 5)])),
    ] {
        db.put_cf(blocks, block_key(0, 1, &key), partial.encode())
            .expect("put");
    }
    let (_, after) = call(&s, "GET", "/v1/recommendations/users/u1", None).await;
    let after = recs(&after);
    assert_eq!(names(&after), expect(&["a", "b", "c", "d"]), "{after:?}");
    // c's score through a fell: a's audience grew from 2 to 3.
    assert!(after["c"] < recs(&first)["c"], "{after:?}");
    let (_, item) = call(&s, "GET", "/v1/recommendations/items/a?basis=view", None).await;
    assert_eq!(item["users"], 3, "{item}");
}

/// Views of `(user, item, block)` pairs as (block, key) partials: each user's history and each
/// item's audience.
fn pair_partials(
    pairs: &[(String, String, u64)],
) -> std::collections::BTreeMap<(u64, ViewKey), Partial> {
    use std::collections::{BTreeMap, BTreeSet};
    use strata_common::views::{Name, Recent, Set};
    let mut out: BTreeMap<(u64, ViewKey), Partial> = BTreeMap::new();
    for (t, (u, i, block)) in pairs.iter().enumerate() {
        let seen = Partial::Recent(Recent(BTreeMap::from([(Name::from(i.as_str()), t as i64)])));
        let member = Partial::Set(Set(BTreeSet::from([Name::from(u.as_str())])));
        for (key, p) in [(history(u), seen), (audience(i), member)] {
            match out.get_mut(&(*block, key.clone())) {
                Some(have) => have.merge(&p),
                None => {
                    out.insert((*block, key), p);
                }
            }
        }
    }
    out
}

/// Asks for every item's co-occurrence rows and checks them against a count over `pairs`
/// (audiences and histories are unions).
async fn assert_rows_counted(s: &Arc<App>, pairs: &[(String, String, u64)], round: &str) {
    use std::collections::{BTreeMap, BTreeSet};
    let mut audiences: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut histories: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (u, i, _) in pairs {
        audiences.entry(i).or_default().insert(u);
        histories.entry(u).or_default().insert(i);
    }
    for (item, users) in &audiences {
        let mut co: BTreeMap<&str, u64> = BTreeMap::new();
        for u in users {
            for other in histories[u].iter().filter(|o| *o != item) {
                *co.entry(other).or_default() += 1;
            }
        }
        let mut want: Vec<(String, u64, u64, f64)> = co
            .into_iter()
            .map(|(other, c)| {
                let n_b = audiences[other].len() as u64;
                let score = c as f64 / (users.len() as f64 * n_b as f64).sqrt();
                (other.to_owned(), c, n_b, score)
            })
            .collect();
        want.sort_by(|a, b| {
            b.3.total_cmp(&a.3)
                .then_with(|| b.1.cmp(&a.1))
                .then_with(|| a.0.cmp(&b.0))
        });
        let path = format!("/v1/recommendations/items/{item}?basis=view&limit=1000");
        let (status, v) = call(s, "GET", &path, None).await;
        assert_eq!(status, 200, "{round} {path}: {v}");
        assert_eq!(v["users"], users.len(), "{round} {path}");
        let got: Vec<(String, u64, u64, f64)> = v["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|r| {
                (
                    r["item"].as_str().unwrap_or_default().to_owned(),
                    r["co_occurrences"].as_u64().unwrap_or_default(),
                    r["users"].as_u64().unwrap_or_default(),
                    r["score"].as_f64().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(got.len(), want.len(), "{round} {path}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((&g.0, g.1, g.2), (&w.0, w.1, w.2), "{round} {path}");
            assert!(
                (g.3 - w.3).abs() < 1e-12,
                "{round} {path}: {g:?} against {w:?}"
            );
        }
    }
}

#[tokio::test]
async fn co_occurrence_rows_equal_a_count_over_the_merged_histories() {
    use strata_common::speed_store::{self, block_key, encode_i64, meta_key, Cf, SpeedReader};

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = computing(dir.path());
    // (user, item, block) pairs from a fixed pseudo-random sequence: the batch version's, then
    // the speed layer's, with users and items the batch never saw.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let batch_pairs: Vec<(String, String, u64)> = (0..600)
        .map(|_| {
            // Skewed towards the first items, as real audiences are.
            let bound = next(30) + 1;
            (format!("u{}", next(60)), format!("i{}", next(bound)), 0)
        })
        .collect();
    let mut views = ViewSet::default();
    for ((_, key), p) in pair_partials(&batch_pairs) {
        views.add(key, &p);
    }
    publish_views(&cfg, &views, batch_pairs.len() as u64);
    let db = speed_past_the_batch(&cfg);
    let meta = speed_store::cf(&db, Cf::Meta).expect("cf");
    let blocks = speed_store::cf(&db, Cf::Blocks).expect("cf");
    let block_size = cfg.handoff.block_size as i64;
    let s = app(ServingState::shared(cfg, SpeedReader::shared(db.clone())));
    s.refresh_batch().expect("load the batch version");

    // States of the speed layer: blocks 1 and 2 consumed past and block 3 open; more in block
    // 3; then one block after another consumed past, each read over the finished blocks' layer
    // and taken into it.
    let mut pairs = batch_pairs.clone();
    let mut rounds = vec![
        ("first".to_string(), 1..=3, (3, 200)),
        ("open block written".to_string(), 3..=3, (3, 60)),
    ];
    let last = 14;
    for block in 4..=last {
        rounds.push((
            format!("block {block} open"),
            block..=block,
            (block as i64, 20),
        ));
    }
    // Within a block, the flushes' deltas go to the journal as the speed layer writes them, and
    // the open block is brought forward from them; at a new block it is read whole.
    let journal = speed_store::cf(&db, Cf::Journal).expect("cf");
    let mut at: Option<(i64, i64)> = None;
    let mut from_journal = 0;
    for (n, (round, blocks_now, (next_block, new_pairs))) in rounds.into_iter().enumerate() {
        let from = *blocks_now.start();
        let span = blocks_now.end() - from + 1;
        let mut added = Vec::new();
        for _ in 0..new_pairs {
            let (u, i, b) = (next(70), next(35), from + next(span));
            added.push((format!("u{u}"), format!("i{i}"), b));
        }
        pairs.extend(added.iter().cloned());
        let speed: Vec<_> = pairs.iter().filter(|p| p.2 > 0).cloned().collect();
        for ((block, key), p) in pair_partials(&speed) {
            db.put_cf(blocks, block_key(0, block, &key), p.encode())
                .expect("put");
        }
        let offset = next_block * block_size + 50 + n as i64;
        if let Some((prev_block, prev)) = at.filter(|(b, _)| *b == next_block) {
            let deltas: Vec<(u64, Vec<u8>, Vec<u8>)> = pair_partials(&added)
                .into_iter()
                .map(|((block, key), p)| (block, key.encode(), p.encode()))
                .collect();
            assert!(deltas.iter().all(|d| d.0 as i64 == prev_block));
            db.put_cf(
                journal,
                speed_store::journal_key(0, offset),
                speed_store::encode_journal(prev, &deltas),
            )
            .expect("put");
            from_journal += 1;
        }
        at = Some((next_block, offset));
        db.put_cf(meta, meta_key::next_offset(0), encode_i64(offset))
            .expect("put");
        assert_rows_counted(&s, &pairs, &round).await;
    }
    assert_eq!(from_journal, 1);
    assert_eq!(
        s.co_rows.journal_steps(),
        1,
        "the open block was brought forward from the journal once"
    );
    assert!(
        pairs.iter().any(|p| p.0 == "u65") && pairs.iter().any(|p| p.1 == "i33"),
        "the speed layer has users and items the batch never saw"
    );
}

/// The dashboard page at `/`: HTML with every panel the dashboard script fills, and only GET.
#[tokio::test]
async fn serves_the_dashboard_page_as_html() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = state(dir.path());
    let res = send(&s, "GET", "/", &[], b"").await;
    assert_eq!(res.status, 200);
    assert_eq!(res.header("content-type"), Some("text/html; charset=utf-8"));
    let body = res.text();
    for id in [
        "id=\"events-per-second\"",
        "id=\"events-chart\"",
        "id=\"top-items\"",
        "id=\"trending\"",
        "id=\"fleet-status\"",
        "id=\"freshness\"",
        "id=\"rec-form\"",
        "id=\"rec-results\"",
    ] {
        assert!(body.contains(id), "the page lacks {id}");
    }
    assert_ne!(send(&s, "POST", "/", &[], b"").await.status, 200);
}
