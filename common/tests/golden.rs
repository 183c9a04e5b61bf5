//! Golden file of every view over a small fixed stream. A change to any view definition shows up
//! as a diff to `tests/golden/small-stream.json`; after reviewing it, accept it with
//! `STRATA_UPDATE_GOLDEN=1 cargo test -p strata-common --test golden`.

use serde_json::{json, Map, Value};
use strata_common::generate::{Class, GenConfig, Generator};
use strata_common::views::{Partial, ViewSet};

fn render(views: &ViewSet) -> Value {
    let mut keys: Vec<_> = views.entries.iter().collect();
    keys.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = Map::new();
    for (k, p) in keys {
        let v = match p {
            Partial::Item(s) => json!({
                "view": s.views, "add_to_cart": s.carts, "purchase": s.purchases, "rating": s.ratings,
                "rating_sum": s.rating_sum, "quantity": s.quantity,
                "revenue_micros": s.revenue_micros.to_string(), "category": s.category,
            }),
            Partial::Device(s) => json!({
                "last_seen": s.last_seen, "heartbeats": s.heartbeats, "readings": s.readings,
                "min": s.min, "max": s.max, "sum_micros": s.sum_micros.to_string(),
            }),
            Partial::Series(s) => json!({
                "counts": s.counts, "quantity": s.quantity,
                "revenue_micros": s.revenue_micros.to_string(), "users_estimate": s.users.estimate().round(),
            }),
            Partial::Distinct(h) => json!({"estimate": h.estimate().round()}),
            Partial::Recent(r) => json!(r.0),
            Partial::Set(s) => json!(s.0),
        };
        out.insert(format!("{k:?}"), v);
    }
    Value::Object(out)
}

#[test]
fn views_of_a_small_fixed_stream_match_the_golden_file() {
    let mut cfg = GenConfig::new(2026, 400, 1_795_600_000_000);
    cfg.span_ms = 3 * 3_600_000;
    cfg.patterns = true;
    let mut views = ViewSet::default();
    let mut seen = std::collections::HashSet::new();
    for g in Generator::new(cfg) {
        if let Class::Event(e) = g.class {
            assert!(seen.insert(e.id.clone()));
            views.fold(&e);
        }
    }
    let got = serde_json::to_string_pretty(&render(&views)).expect("json") + "\n";
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/small-stream.json");
    if std::env::var_os("STRATA_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).expect("write golden file");
    }
    let want =
        std::fs::read_to_string(&path).expect("golden file (STRATA_UPDATE_GOLDEN=1 writes it)");
    assert!(
        got == want,
        "views differ from {}; review the diff, then STRATA_UPDATE_GOLDEN=1",
        path.display()
    );
}
