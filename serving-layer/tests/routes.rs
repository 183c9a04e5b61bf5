//! The routes in-process (`warp::test`), over a published batch version and no speed state.

use std::sync::Arc;

use serde_json::Value;
use strata_common::batch_store::{self, Manifest};
use strata_common::config::Config;
use strata_common::handoff::Offsets;
use strata_common::views::{DeviceStats, ItemStats, Partial, ViewKey, ViewSet};
use strata_serving::api::routes;
use strata_serving::ServingState;

const KEY: &str = "route-test-key";

fn state(dir: &std::path::Path) -> Arc<ServingState> {
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
        },
    )
    .expect("publish");
    Arc::new(ServingState::following(cfg))
}

async fn call(
    state: &Arc<ServingState>,
    method: &str,
    path: &str,
    auth: Option<&str>,
) -> (u16, Value) {
    let mut req = warp::test::request().method(method).path(path);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let res = req.reply(&routes(state.clone())).await;
    let body: Value = serde_json::from_slice(res.body()).expect("every answer is JSON");
    (res.status().as_u16(), body)
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
    ] {
        let (status, v) = call(&s, method, path, None).await;
        assert_eq!(status, want, "{method} {path}: {v}");
        assert!(v["error"]["message"].is_string(), "{method} {path}: {v}");
    }
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
