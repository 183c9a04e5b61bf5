//! `compare-batch`: checks that every view DuckDB computes (`bench/duckdb_views.py`) equals the
//! batch version Strata published over the same master dataset: item totals, device totals and
//! each device's readings per metric and hour exactly, row by row; the overall series per
//! minute, hour and day exactly (counts per type, units, revenue), and each bucket's distinct
//! users, and each item's distinct users per day, within four standard errors of the exact
//! count; the item series per granularity and the users' items and items' users per basis by
//! digests (rows, sums, and a time-weighted sum that moves if an event lands in another bucket).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use strata_common::batch_store;
use strata_common::views::{
    Basis, DeviceStats, Gran, Partial, ViewKey, HLL_REGISTERS, HLL_STANDARD_ERROR,
};

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
                if !within_sketch_error(s.users.estimate(), exact) {
                    differ(format!(
                        "{name} bucket {start}: distinct users {:.0}, exactly {exact}",
                        s.users.estimate()
                    ));
                }
            }
        }
    }
    // Item series, per granularity, by digest: rows, sums per field, revenue, a time-weighted
    // count, distinct items; one pass over the version.
    #[derive(Default, Debug, PartialEq)]
    struct Digest {
        rows: u64,
        sums: [u64; 6],
        revenue: i128,
        weighted: i128,
        items: u64,
    }
    let mut digests: [Digest; 3] = Default::default();
    let mut names: [std::collections::BTreeSet<&str>; 3] = Default::default();
    for (k, p) in &views.entries {
        let (ViewKey::ItemSeries { gran, start, item }, Partial::Item(s)) = (k, p) else {
            continue;
        };
        let g = Gran::ALL.iter().position(|x| x == gran).unwrap_or(0);
        let d = &mut digests[g];
        d.rows += 1;
        names[g].insert(item.as_str());
        for (sum, v) in d.sums.iter_mut().zip(s.counts()) {
            *sum += v;
        }
        d.revenue += s.revenue_micros;
        d.weighted += i128::from(start.div_euclid(60_000))
            * i128::from(s.views + s.carts + s.purchases + s.ratings);
    }
    for ((ours, names), name) in digests
        .iter_mut()
        .zip(&names)
        .zip(["minute", "hour", "day"])
    {
        ours.items = names.len() as u64;
        let d = &peer["item_series"][name];
        let theirs = Digest {
            rows: u(d, "rows"),
            sums: [
                u(d, "views"),
                u(d, "carts"),
                u(d, "purchases"),
                u(d, "quantity"),
                u(d, "ratings"),
                u(d, "rating_sum"),
            ],
            revenue: micros(d, "revenue_micros").unwrap_or(i128::MIN),
            weighted: micros(d, "weighted").unwrap_or(i128::MIN),
            items: u(d, "items"),
        };
        if *ours != theirs {
            differ(format!(
                "item series per {name}: strata {ours:?} duckdb {theirs:?}"
            ));
        }
    }

    // Distinct users of each item per day: every row, within the sketch's error.
    let day_users: BTreeMap<(i64, &str), f64> = views
        .entries
        .iter()
        .filter_map(|(k, p)| match (k, p) {
            (ViewKey::ItemDayUsers { day, item }, Partial::Distinct(h)) => {
                Some(((*day, item.as_str()), h.estimate()))
            }
            _ => None,
        })
        .collect();
    let rows = peer["item_day_users"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if rows.len() != day_users.len() {
        differ(format!(
            "item day users: strata {} keys, duckdb {}",
            day_users.len(),
            rows.len()
        ));
    }
    for row in rows {
        let (item, day) = (row["item"].as_str().unwrap_or(""), row["day"].as_i64());
        let exact = u(row, "users") as f64;
        match day.and_then(|d| day_users.get(&(d, item))) {
            None => differ(format!("item {item} day {day:?}: not in strata's version")),
            Some(est) => {
                let err = (est - exact).abs() / exact.max(1.0);
                worst_users = worst_users.max(err);
                if !within_sketch_error(*est, exact) {
                    differ(format!(
                        "item {item} day {day:?}: distinct users {est:.0}, exactly {exact}"
                    ));
                }
            }
        }
    }

    // Devices and their readings per metric and hour: every row, exactly.
    let device_row = |s: &DeviceStats| {
        (
            s.last_seen,
            s.heartbeats,
            s.readings,
            s.sum_micros,
            s.min,
            s.max,
        )
    };
    let peer_row = |d: &Value, heartbeats: u64| {
        (
            d["last_seen"].as_i64(),
            heartbeats,
            u(d, "readings"),
            micros(d, "sum_micros").unwrap_or(i128::MIN),
            d["min"].as_f64(),
            d["max"].as_f64(),
        )
    };
    let peer_devices = peer["devices"].as_object().unwrap_or(&empty);
    let mut devices = 0u64;
    let mut hours: BTreeMap<(i64, &str, &str), &DeviceStats> = BTreeMap::new();
    for (key, partial) in &views.entries {
        match (key, partial) {
            (ViewKey::Device(name), Partial::Device(s)) => {
                devices += 1;
                match peer_devices.get(name.as_str()) {
                    None => differ(format!("device {name}: not in duckdb's answer")),
                    Some(d) => {
                        let (ours, theirs) = (device_row(s), peer_row(d, u(d, "heartbeats")));
                        if ours != theirs {
                            differ(format!("device {name}: strata {ours:?} duckdb {theirs:?}"));
                        }
                    }
                }
            }
            (
                ViewKey::DeviceMetricHour {
                    start,
                    device,
                    metric,
                },
                Partial::Device(s),
            ) => {
                hours.insert((*start, device.as_str(), metric.as_str()), s);
            }
            _ => {}
        }
    }
    if devices != peer_devices.len() as u64 {
        differ(format!(
            "devices: strata {devices} duckdb {}",
            peer_devices.len()
        ));
    }
    let rows = peer["device_metric_hour"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if rows.len() != hours.len() {
        differ(format!(
            "device metric hours: strata {} duckdb {}",
            hours.len(),
            rows.len()
        ));
    }
    for row in rows {
        let key = (
            row["start"].as_i64().unwrap_or(i64::MIN),
            row["device"].as_str().unwrap_or(""),
            row["metric"].as_str().unwrap_or(""),
        );
        match hours.get(&key) {
            None => differ(format!(
                "device metric hour {key:?}: not in strata's version"
            )),
            Some(s) => {
                let (ours, theirs) = (device_row(s), peer_row(row, 0));
                if ours != theirs {
                    differ(format!(
                        "device metric hour {key:?}: strata {ours:?} duckdb {theirs:?}"
                    ));
                }
            }
        }
    }

    // Users' items (with the latest time) and items' users, per basis, by digest: users,
    // their items, the sum of the latest times, items, their users; one pass over the version.
    let mut sets = [(0u64, 0u64, 0i128, 0u64, 0u64); 2];
    for (k, p) in &views.entries {
        match (k, p) {
            (ViewKey::UserItems { basis, .. }, Partial::Recent(r)) => {
                let d = &mut sets[basis.index()];
                d.0 += 1;
                d.1 += r.0.len() as u64;
                d.2 += r.0.values().map(|&t| i128::from(t)).sum::<i128>();
            }
            (ViewKey::ItemUsers { basis, .. }, Partial::Set(set)) => {
                let d = &mut sets[basis.index()];
                d.3 += 1;
                d.4 += set.0.len() as u64;
            }
            _ => {}
        }
    }
    for basis in Basis::ALL {
        let name = match basis {
            Basis::View => "view",
            Basis::Purchase => "purchase",
        };
        let (users, user_items, last_sum, items, item_users) = sets[basis.index()];
        let d = &peer["sets"][name];
        let ours = (users, user_items, Some(last_sum), items, item_users);
        let theirs = (
            u(d, "users"),
            u(d, "user_items"),
            micros(d, "last_sum"),
            u(d, "items"),
            u(d, "item_users"),
        );
        if ours != theirs {
            differ(format!("{name} sets: strata {ours:?} duckdb {theirs:?}"));
        }
    }

    out.num("items", items as f64);
    out.num("devices", devices as f64);
    out.num("device_metric_hours", hours.len() as f64);
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

/// Whether a sketch's estimate is one the sketch gives for `exact` distinct users except with
/// a chance below one in 10^9: within four relative standard errors, or one user off, or, while
/// the sketch counts by its empty registers (linear counting, below 2.5 registers per user), no
/// further below than the collisions of `exact` users' registers reach. Those collisions are
/// about Poisson with mean `exact - m (1 - e^(-exact/m))` (m registers): 18 users share a register
/// twice once in about 300 buckets, which four standard errors (1.7 users) do not allow.
fn within_sketch_error(estimate: f64, exact: f64) -> bool {
    let off = (estimate - exact).abs();
    if off <= 1.0 || off / exact.max(1.0) <= 4.0 * HLL_STANDARD_ERROR {
        return true;
    }
    let m = HLL_REGISTERS as f64;
    if exact > 2.5 * m {
        return false;
    }
    // The linear-counting estimate of `k` set registers.
    let counted = |k: f64| m * (m / (m - k).max(0.5)).ln();
    let mean = exact - m * (1.0 - (-exact / m).exp());
    let shared = poisson_quantile(mean, 1e-9);
    // No collision at all is the highest estimate; `shared` collisions the lowest allowed.
    estimate <= counted(exact) + 0.5 && estimate >= counted((exact - shared).max(0.0)) - 0.5
}

/// The smallest `d` with P(X > d) <= `tail` for X Poisson with mean `mean`; above a mean of 100
/// (where e^-mean underflows soon after), the normal approximation's mean + 6.2 sd.
fn poisson_quantile(mean: f64, tail: f64) -> f64 {
    if mean > 100.0 {
        return (mean + 6.2 * mean.sqrt()).ceil();
    }
    let (mut term, mut below, mut d) = ((-mean).exp(), 0.0, 0.0);
    while 1.0 - below > tail && d < 1_000.0 {
        below += term;
        if 1.0 - below <= tail {
            break;
        }
        d += 1.0;
        term *= mean / d;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sketch_error_allows_register_collisions_of_few_users_and_not_more() {
        // 18 users in 16 registers: two collisions, about one bucket in 300.
        let m = HLL_REGISTERS as f64;
        let sixteen = m * (m / (m - 16.0)).ln();
        assert!(within_sketch_error(sixteen, 18.0));
        // Half the users lost is no collision.
        assert!(!within_sketch_error(9.0, 18.0));
        // Above the exact count by more than no collision gives.
        assert!(!within_sketch_error(21.0, 18.0));
        // Large counts: four standard errors.
        assert!(within_sketch_error(10_500.0, 10_000.0));
        assert!(!within_sketch_error(11_000.0, 10_000.0));
        assert_eq!(poisson_quantile(0.0785, 1e-9), 5.0);
        assert!(within_sketch_error(4_000.0, 4_100.0));
        assert_eq!(poisson_quantile(0.0, 1e-9), 0.0);
    }
}
