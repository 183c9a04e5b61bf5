//! Device health: one device in detail, and the fleet's "everything is OK" signal.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use strata_common::time::{format_rfc3339, now_millis, Millis};
use strata_common::views::{tag, DeviceStats, Gran, Partial, ViewKey};

use crate::error::ApiError;
use crate::query::device_status;
use crate::state::ServingState;

fn status_of(state: &ServingState, s: &DeviceStats, now: Millis) -> &'static str {
    let c = &state.cfg.serve;
    device_status(s.last_seen, now, c.late_after_secs, c.silent_after_secs)
}

/// One device: liveness, all-time reading statistics, and per metric the hourly windows of the
/// last `hours` hours, each flagged when its readings leave the metric's configured bounds.
pub fn device(state: &ServingState, device: &str, hours: i64) -> Result<Value, ApiError> {
    state.with_merge(|m| {
        let Some(Partial::Device(s)) = m.get(&ViewKey::Device(device.into()))? else {
            return Err(ApiError::not_found(format!("no events for device {device:?}")));
        };
        let now = now_millis();
        let from = Gran::Hour.floor(now) - (hours - 1) * 3_600_000;
        let windows = m.collect(
            &[tag::DEVICE_METRIC_HOUR],
            Some(&ViewKey::timed_from(tag::DEVICE_METRIC_HOUR, from)),
            |k| matches!(k, ViewKey::DeviceMetricHour { device: d, .. } if d == device),
        )?;
        let mut metrics: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut out_of_range = 0;
        for (k, p) in windows {
            let (ViewKey::DeviceMetricHour { start, metric, .. }, Partial::Device(w)) = (k, p) else {
                continue;
            };
            let bounds = state.cfg.serve.metric_bounds.get(metric.as_str());
            let flagged = bounds.is_some_and(|b| {
                w.min.is_some_and(|v| v < b.min) || w.max.is_some_and(|v| v > b.max)
            });
            out_of_range += u64::from(flagged);
            metrics.entry(metric.into()).or_default().push(json!({
                "start": format_rfc3339(start),
                "count": w.readings,
                "min": w.min,
                "max": w.max,
                "mean": w.mean(),
                "out_of_range": flagged,
            }));
        }
        let serve = &state.cfg.serve;
        Ok(json!({
            "device": device,
            "last_seen": s.last_seen.map(format_rfc3339),
            "heartbeats": s.heartbeats,
            "readings": {"count": s.readings, "min": s.min, "max": s.max, "mean": s.mean()},
            "status": status_of(state, &s, now),
            "thresholds": {"late_after_secs": serve.late_after_secs, "silent_after_secs": serve.silent_after_secs},
            "windows": {"hours": hours, "out_of_range": out_of_range, "metrics": metrics},
            "bounds": serve.metric_bounds,
            "as_of": m.as_of,
        }))
    })
}

/// The fleet: how many devices are ok, late and silent, which ones are not ok, and an overall
/// status that is `ok` only when every device is.
pub fn fleet(state: &ServingState) -> Result<Value, ApiError> {
    state.with_merge(|m| {
        let now = now_millis();
        let all = m.all(tag::DEVICE)?;
        let (mut ok, mut late, mut silent) = (0u64, Vec::new(), Vec::new());
        for (k, p) in &all {
            let (ViewKey::Device(d), Partial::Device(s)) = (k, p) else {
                continue;
            };
            match status_of(state, s, now) {
                "ok" => ok += 1,
                "late" => {
                    late.push(json!({"device": d, "last_seen": s.last_seen.map(format_rfc3339)}))
                }
                _ => {
                    silent.push(json!({"device": d, "last_seen": s.last_seen.map(format_rfc3339)}))
                }
            }
        }
        let status = if all.is_empty() {
            "no_devices"
        } else if late.is_empty() && silent.is_empty() {
            "ok"
        } else {
            "degraded"
        };
        Ok(json!({
            "status": status,
            "devices": all.len(),
            "counts": {"ok": ok, "late": late.len(), "silent": silent.len()},
            "late": late,
            "silent": silent,
            "as_of": m.as_of,
        }))
    })
}
