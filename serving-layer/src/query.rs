//! The questions the API answers, each a merge of the batch version and the speed blocks.

use serde_json::{json, Value};
use strata_common::time::Millis;
use strata_common::views::{ItemStats, Partial, Snapshot, ViewKey};

use crate::error::ApiError;
use crate::state::{Merge, ServingState};

/// All-time totals of one item.
pub fn item(state: &ServingState, item: &str) -> Result<Value, ApiError> {
    state.with_merge(|m| {
        let Some(Partial::Item(s)) = m.get(&ViewKey::Item(item.into()))? else {
            return Err(ApiError::not_found(format!("no events for item {item:?}")));
        };
        Ok(item_json(item, &s, m))
    })
}

fn item_json(item: &str, s: &ItemStats, m: &Merge<'_>) -> Value {
    json!({
        "item": item,
        "category": s.category,
        "counts": {
            "view": s.views,
            "add_to_cart": s.carts,
            "purchase": s.purchases,
            "rating": s.ratings,
        },
        "quantity": s.quantity,
        "revenue": s.revenue(),
        "rating": {
            "count": s.ratings,
            "mean": (s.ratings > 0).then(|| s.rating_sum as f64 / s.ratings as f64),
        },
        "as_of": m.as_of,
    })
}

/// `ok`, `late` or `silent`, by the time since the device was last seen.
pub fn device_status(
    last_seen: Option<Millis>,
    now: Millis,
    late_after_secs: i64,
    silent_after_secs: i64,
) -> &'static str {
    let Some(seen) = last_seen else {
        return "silent";
    };
    let age = now.saturating_sub(seen);
    if age <= late_after_secs * 1000 {
        "ok"
    } else if age <= silent_after_secs * 1000 {
        "late"
    } else {
        "silent"
    }
}

/// Batch version and cutoffs, speed offsets and counters, consumer lag.
pub fn status(state: &ServingState) -> Result<Value, ApiError> {
    state.with_merge(|m| {
        let hw = state.high_watermarks();
        let batch = state.batch();
        let speed = &m.speed_meta;
        let (accepted, rejected, duplicates) = speed.partitions.values().fold((0, 0, 0), |a, p| {
            (a.0 + p.accepted, a.1 + p.rejected, a.2 + p.duplicates)
        });
        let lag: Option<Value> = hw.as_ref().map(|hw| {
            let per: serde_json::Map<String, Value> = hw
                .iter()
                .map(|(p, &high)| {
                    let next = speed.partitions.get(p).map_or(0, |s| s.next_offset);
                    (p.to_string(), json!((high - next).max(0)))
                })
                .collect();
            let total: i64 = per.values().filter_map(Value::as_i64).sum();
            json!({"total": total, "partitions": per})
        });
        Ok(json!({
            "topic": state.cfg.kafka.topic,
            "batch": batch.as_ref().map(|b| json!({
                "version": b.manifest.version,
                "published_at": b.manifest.published_at,
                "block_size": b.manifest.block_size,
                "cutoffs": b.manifest.cutoffs,
                "events": b.manifest.events,
                "duplicates": b.manifest.duplicates,
                "keys": b.manifest.keys,
                "duration_ms": b.manifest.duration_ms,
                "load_ms": b.load_ms,
            })),
            "speed": {
                "block_size": speed.block_size,
                "offsets": m.as_of.speed.offsets,
                "events": {"accepted": accepted, "rejected": rejected, "duplicates": duplicates},
                "partitions": speed.partitions.iter().map(|(p, s)| (p.to_string(), json!({
                    "next_offset": s.next_offset,
                    "first_live_block": s.first_live_block,
                    "accepted": s.accepted,
                    "rejected": s.rejected,
                    "duplicates": s.duplicates,
                    "stall": s.stall,
                    "skipped": s.skipped,
                }))).collect::<serde_json::Map<String, Value>>(),
                "stalled": speed.partitions.iter().filter(|(_, s)| s.stall.is_some()).map(|(p, _)| *p).collect::<Vec<_>>(),
            },
            "archive": {
                "stalled": strata_common::undecodable::read_stalls(&state.cfg.master_dir()),
            },
            "lag": lag,
            "high_watermarks": hw,
            "broker": state.broker(),
            "as_of": m.as_of,
        }))
    })
}

/// Every merged partial with the offsets it covers, for `strata verify`.
pub fn snapshot(state: &ServingState) -> Result<Snapshot, ApiError> {
    state.with_merge(|m| {
        let entries = m.collect(&[], None, |_| true)?.into_iter().collect();
        Ok(Snapshot {
            coverage: m.as_of.coverage.clone(),
            batch_version: m.as_of.batch.as_ref().map(|b| b.version),
            entries,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_status_by_thresholds() {
        assert_eq!(device_status(Some(1_000), 1_000 + 120_000, 120, 600), "ok");
        assert_eq!(
            device_status(Some(1_000), 1_000 + 120_001, 120, 600),
            "late"
        );
        assert_eq!(
            device_status(Some(1_000), 1_000 + 600_001, 120, 600),
            "silent"
        );
        assert_eq!(device_status(None, 0, 120, 600), "silent");
    }
}
