//! `compare-batch`: checks that DuckDB's aggregates (from `bench/duckdb_views.py`) equal the
//! batch version Strata published over the same master dataset: item totals exactly, the
//! overall series per minute, hour and day exactly (counts per type, units, revenue), and each
//! bucket's distinct users within four standard errors of the exact count.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use strata_common::batch_store;
use strata_common::views::{Gran, Partial, ViewKey, HLL_STANDARD_ERROR};

use crate::Out;

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(u64::MAX)
}

fn micros(v: &Value, key: &str) -> Option<i128> {
    v[key].as_str().and_then(|s| s.parse().ok())
}

pub fn run(data_dir: &Path, duckdb: &Path, out: &mut Out) -> Result<()> {
    let text =
        std::fs::read_to_string(duckdb).with_context(|| format!("reading {}", duckdb.display()))?;
    let peer: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", duckdb.display()))?;
    let manifest = batch_store::read_current(data_dir)?
        .with_context(|| format!("no batch version published in {}", data_dir.display()))?;
    let views = batch_store::load_views(data_dir, &manifest)?;
    let mut differences: Vec<String> = Vec::new();
    let mut differ = |what: String| {
        if differences.len() < 20 {
            eprintln!("difference: {what}");
        }
        differences.push(what);
    };

    if peer["events"].as_u64() != Some(manifest.events) {
        differ(format!(
            "events: strata {} duckdb {}",
            manifest.events, peer["events"]
        ));
    }

    let empty = serde_json::Map::new();
    let peer_items = peer["items"].as_object().unwrap_or(&empty);
    let mut items = 0u64;
    for (key, partial) in &views.entries {
        let (ViewKey::Item(name), Partial::Item(s)) = (key, partial) else {
            continue;
        };
        items += 1;
        let Some(d) = peer_items.get(name.as_str()) else {
            differ(format!("item {name}: not in duckdb's answer"));
            continue;
        };
        let ours = (
            s.views,
            s.carts,
            s.purchases,
            s.quantity,
            Some(s.revenue_micros),
            s.ratings,
            s.rating_sum,
            s.category.as_deref(),
        );
        let theirs = (
            u(d, "views"),
            u(d, "carts"),
            u(d, "purchases"),
            u(d, "quantity"),
            micros(d, "revenue_micros"),
            u(d, "ratings"),
            u(d, "rating_sum"),
            d["category"].as_str(),
        );
        if ours != theirs {
            differ(format!("item {name}: strata {ours:?} duckdb {theirs:?}"));
        }
    }
    if items != peer_items.len() as u64 {
        differ(format!("items: strata {items} duckdb {}", peer_items.len()));
    }

    let (mut buckets, mut worst_users) = (0u64, 0f64);
    for (gran, name) in [
        (Gran::Minute, "minute"),
        (Gran::Hour, "hour"),
        (Gran::Day, "day"),
    ] {
        let ours: BTreeMap<i64, _> = views
            .entries
            .iter()
            .filter_map(|(k, p)| match (k, p) {
                (ViewKey::Series { gran: g, start }, Partial::Series(s)) if *g == gran => {
                    Some((*start, s))
                }
                _ => None,
            })
            .collect();
        let rows = peer["series"][name]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        if rows.len() != ours.len() {
            differ(format!(
                "{name} buckets: strata {} duckdb {}",
                ours.len(),
                rows.len()
            ));
        }
        for row in rows {
            let start = row["start"].as_i64().unwrap_or(i64::MIN);
            let Some(s) = ours.get(&start) else {
                differ(format!("{name} bucket {start}: not in strata's version"));
                continue;
            };
            buckets += 1;
            let counts: Vec<u64> = row["counts"]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(u64::MAX)).collect())
                .unwrap_or_default();
            let theirs = (counts, u(row, "quantity"), micros(row, "revenue_micros"));
            let mine = (s.counts.to_vec(), s.quantity, Some(s.revenue_micros));
            if mine != theirs {
                differ(format!(
                    "{name} bucket {start}: strata {mine:?} duckdb {theirs:?}"
                ));
            }
            let exact = u(row, "users") as f64;
            if exact > 0.0 {
                let err = (s.users.estimate() - exact).abs() / exact;
                worst_users = worst_users.max(err);
                if err > 4.0 * HLL_STANDARD_ERROR {
                    differ(format!(
                        "{name} bucket {start}: distinct users {:.0}, exactly {exact}",
                        s.users.estimate()
                    ));
                }
            }
        }
    }
    out.num("items", items as f64);
    out.num("buckets", buckets as f64);
    out.num("events", manifest.events as f64);
    out.text("worst_distinct_users_error", &format!("{worst_users:.4}"));
    out.num("differences", differences.len() as f64);
    if !differences.is_empty() {
        bail!(
            "{} differences between strata's batch version {} and duckdb",
            differences.len(),
            manifest.version
        );
    }
    Ok(())
}
