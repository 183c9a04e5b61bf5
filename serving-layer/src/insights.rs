//! Insights: top items by window and category, trending items, time series.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use strata_common::time::{format_rfc3339, now_millis, parse_rfc3339, Millis};
use strata_common::views::{tag, Gran, Partial, ViewKey, HLL_STANDARD_ERROR};

use crate::error::ApiError;
use crate::rankings::{ItemTotals, TotalsMemo};
use crate::state::{Merge, ServingState};

/// A look-back window, in event time, ending now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    Hour,
    Day,
    Week,
    All,
}

impl Window {
    pub fn parse(s: &str) -> Result<Window, ApiError> {
        match s {
            "1h" => Ok(Window::Hour),
            "24h" => Ok(Window::Day),
            "7d" => Ok(Window::Week),
            "all" => Ok(Window::All),
            _ => Err(ApiError::bad_request(format!(
                "window must be 1h, 24h, 7d or all; got {s:?}"
            ))),
        }
    }

    /// The buckets a window covers: the granularity and the first bucket's start. The current
    /// bucket is included, so `1h` is the last 60 minute buckets, `24h` the last 24 hour buckets.
    pub fn buckets(self, now: Millis) -> Option<(Gran, Millis)> {
        match self {
            Window::Hour => Some((Gran::Minute, Gran::Minute.floor(now) - 59 * 60_000)),
            Window::Day => Some((Gran::Hour, Gran::Hour.floor(now) - 23 * 3_600_000)),
            Window::Week => Some((Gran::Hour, Gran::Hour.floor(now) - 167 * 3_600_000)),
            Window::All => None,
        }
    }

    pub fn hours(self) -> f64 {
        match self {
            Window::Hour => 1.0,
            Window::Day => 24.0,
            Window::Week => 168.0,
            Window::All => f64::INFINITY,
        }
    }
}

/// Per-item totals over a window, in the state of `m` (see [`crate::rankings`]).
pub fn item_totals(
    windows: &TotalsMemo,
    m: &Merge<'_>,
    window: Window,
    now: Millis,
) -> Result<ItemTotals, ApiError> {
    windows.totals(m, window.buckets(now))
}

/// The ranked event types, as the static names rankings are kept under.
fn check_type(event_type: &str) -> Result<&'static str, ApiError> {
    if let Some(t) = ["view", "add_to_cart", "purchase", "rating"]
        .into_iter()
        .find(|t| *t == event_type)
    {
        Ok(t)
    } else {
        Err(ApiError::bad_request(format!(
            "type must be one of view, add_to_cart, purchase, rating; got {event_type:?}"
        )))
    }
}

/// The items with the most events of one type in a window, optionally in one category.
pub fn top_items(
    state: &ServingState,
    windows: &TotalsMemo,
    event_type: &str,
    window: Window,
    category: Option<&str>,
    limit: usize,
) -> Result<Value, ApiError> {
    let event_type = check_type(event_type)?;
    state.with_merge(|m| {
        let key = window.buckets(now_millis());
        let (ranked, as_of) = windows.top(m, key, event_type, category, limit)?;
        let items: Vec<Value> = ranked
            .iter()
            .map(|(item, count)| json!({"item": item, "count": count}))
            .collect();
        Ok(json!({
            "type": event_type,
            "window": window_name(window),
            "category": category,
            "items": items,
            "as_of": as_of,
        }))
    })
}

fn window_name(w: Window) -> &'static str {
    match w {
        Window::Hour => "1h",
        Window::Day => "24h",
        Window::Week => "7d",
        Window::All => "all",
    }
}

/// Items whose recent rate is highest against their baseline rate. An item needs at least
/// `min_support` events in the recent window; the baseline rate counts the baseline window
/// without the recent one, plus one event (so an item new in the recent window has a finite score).
pub fn trending(
    state: &ServingState,
    windows: &TotalsMemo,
    event_type: &str,
    window: Window,
    baseline: Window,
    min_support: u64,
    limit: usize,
) -> Result<Value, ApiError> {
    let event_type = check_type(event_type)?;
    if window == Window::All || baseline == Window::All || baseline.hours() <= window.hours() {
        return Err(ApiError::bad_request(
            "trending needs a window of 1h or 24h and a longer baseline of 24h or 7d",
        ));
    }
    state.with_merge(|m| {
        let now = now_millis();
        let keys = (window.buckets(now), baseline.buckets(now));
        let hours = (window.hours(), baseline.hours() - window.hours());
        let (rows, as_of) = windows.trending_now(m, keys, event_type, min_support, hours, limit)?;
        let rest_hours = hours.1;
        let items: Vec<Value> = rows
            .iter()
            .map(|(item, score, r, before)| {
                json!({
                    "item": item,
                    "score": score,
                    "recent": r,
                    "baseline": before,
                    "recent_per_hour": *r as f64 / window.hours(),
                    "baseline_per_hour": *before as f64 / rest_hours,
                })
            })
            .collect();
        Ok(json!({
            "type": event_type,
            "window": window_name(window),
            "baseline": window_name(baseline),
            "min_support": min_support,
            "items": items,
            "as_of": as_of,
        }))
    })
}

/// What a time series measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Events,
    Revenue,
    DistinctUsers,
}

impl Metric {
    pub fn parse(s: &str) -> Result<Metric, ApiError> {
        match s {
            "events" => Ok(Metric::Events),
            "revenue" => Ok(Metric::Revenue),
            "distinct_users" => Ok(Metric::DistinctUsers),
            _ => Err(ApiError::bad_request(format!(
                "metric must be events, revenue or distinct_users; got {s:?}"
            ))),
        }
    }
}

/// The parameters of a time-series query.
pub struct SeriesQuery {
    pub metric: Metric,
    pub event_type: Option<String>,
    pub item: Option<String>,
    pub gran: Gran,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// Most buckets one query may ask for.
pub const MAX_BUCKETS: i64 = 10_000;

/// Values per bucket, empty buckets included as zero.
pub fn timeseries(state: &ServingState, q: &SeriesQuery) -> Result<Value, ApiError> {
    let g = q.gran.millis();
    let time = |s: &Option<String>, name: &str| -> Result<Option<Millis>, ApiError> {
        s.as_ref()
            .map(|s| {
                parse_rfc3339(s).ok_or_else(|| {
                    ApiError::bad_request(format!("{name} must be an RFC 3339 time; got {s:?}"))
                })
            })
            .transpose()
    };
    let to = q.gran.floor(time(&q.to, "to")?.unwrap_or_else(now_millis));
    let from = q.gran.floor(time(&q.from, "from")?.unwrap_or(to - 59 * g));
    if from > to {
        return Err(ApiError::bad_request("from is after to"));
    }
    if (to - from) / g + 1 > MAX_BUCKETS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_BUCKETS} buckets per query; use a coarser bucket or a shorter range"
        )));
    }
    if let Some(t) = &q.event_type {
        if !strata_common::event::EVENT_TYPES.contains(&t.as_str()) {
            return Err(ApiError::bad_request(format!("unknown type {t:?}")));
        }
    }
    if q.metric == Metric::DistinctUsers && q.item.is_some() && q.gran != Gran::Day {
        return Err(ApiError::bad_request(
            "distinct users of one item are kept per day: use bucket=day",
        ));
    }
    if q.metric == Metric::DistinctUsers && q.event_type.is_some() {
        return Err(ApiError::bad_request("distinct_users does not take a type"));
    }
    state.with_merge(|m| {
        if let Some(first) = m.retention().minute_floor(q.gran, q.item.is_some()) {
            if from < first {
                return Err(ApiError::new(
                    warp::http::StatusCode::GONE,
                    "beyond_retention",
                    format!(
                        "minute buckets before {} are beyond retention (rolled up into hours or past retention.minute-series-days); ask from {} on, or use bucket=hour or bucket=day",
                        format_rfc3339(first),
                        format_rfc3339(first)
                    ),
                ));
            }
        }
        let mut values: BTreeMap<Millis, f64> = BTreeMap::new();
        let in_range = |start: Millis| start >= from && start <= to;
        match (&q.item, q.metric) {
            (Some(item), Metric::DistinctUsers) => {
                let parts = m.collect(
                    &[tag::ITEM_DAY_USERS],
                    Some(&ViewKey::timed_from(tag::ITEM_DAY_USERS, from)),
                    |k| matches!(k, ViewKey::ItemDayUsers { day, item: i } if in_range(*day) && i == item),
                )?;
                for (k, p) in parts {
                    if let (ViewKey::ItemDayUsers { day, .. }, Partial::Distinct(h)) = (k, p) {
                        values.insert(day, h.estimate().round());
                    }
                }
            }
            (Some(item), metric) => {
                let parts = m.collect(
                    &ViewKey::series_prefix(tag::ITEM_SERIES, q.gran),
                    Some(&ViewKey::series_from(tag::ITEM_SERIES, q.gran, from)),
                    |k| matches!(k, ViewKey::ItemSeries { start, item: i, .. } if in_range(*start) && i == item),
                )?;
                for (k, p) in parts {
                    if let (ViewKey::ItemSeries { start, .. }, Partial::Item(s)) = (k, p) {
                        let v = match metric {
                            Metric::Revenue => s.revenue(),
                            _ => match &q.event_type {
                                Some(t) => s.count(t).unwrap_or(0) as f64,
                                None => (s.views + s.carts + s.purchases + s.ratings) as f64,
                            },
                        };
                        values.insert(start, v);
                    }
                }
            }
            (None, metric) => {
                let parts = m.collect(
                    &ViewKey::series_prefix(tag::SERIES, q.gran),
                    Some(&ViewKey::series_from(tag::SERIES, q.gran, from)),
                    |k| matches!(k, ViewKey::Series { start, .. } if in_range(*start)),
                )?;
                for (k, p) in parts {
                    if let (ViewKey::Series { start, .. }, Partial::Series(s)) = (k, p) {
                        let v = match metric {
                            Metric::Events => s.count(q.event_type.as_deref()).unwrap_or(0) as f64,
                            Metric::Revenue => s.revenue_micros as f64 / 1e6,
                            Metric::DistinctUsers => s.users.estimate().round(),
                        };
                        values.insert(start, v);
                    }
                }
            }
        }
        let points: Vec<Value> = (0..=(to - from) / g)
            .map(|i| {
                let start = from + i * g;
                json!({"start": format_rfc3339(start), "value": values.get(&start).copied().unwrap_or(0.0)})
            })
            .collect();
        let mut answer = json!({
            "metric": match q.metric { Metric::Events => "events", Metric::Revenue => "revenue", Metric::DistinctUsers => "distinct_users" },
            "bucket": match q.gran { Gran::Minute => "minute", Gran::Hour => "hour", Gran::Day => "day" },
            "type": q.event_type,
            "item": q.item,
            "from": format_rfc3339(from),
            "to": format_rfc3339(to),
            "points": points,
            "as_of": m.as_of,
        });
        if q.metric == Metric::DistinctUsers {
            answer["error_bound"] = json!({
                "sketch": "HyperLogLog, 2048 registers",
                "relative_standard_error": HLL_STANDARD_ERROR,
            });
        }
        Ok(answer)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::WINDOW_REACH;

    /// A loaded version holds the item series from [`WINDOW_REACH`] before the bucket it was
    /// loaded in; every window asked for later must start inside it.
    #[test]
    fn every_window_starts_within_the_reach_a_version_holds() {
        for now in [
            0,
            59_999,
            60_000,
            3_599_999,
            1_796_700_012_345,
            1_796_703_600_000,
        ] {
            for later in [0, 1, 59_999, 3_600_000, 86_400_000 * 30] {
                for w in [Window::Hour, Window::Day, Window::Week] {
                    let Some((gran, from)) = w.buckets(now + later) else {
                        panic!("{w:?} has buckets");
                    };
                    let Some((_, reach)) = WINDOW_REACH.iter().find(|(g, _)| *g == gran) else {
                        panic!("{gran:?} of {w:?} is held");
                    };
                    assert!(
                        from >= gran.floor(now) - reach * gran.millis(),
                        "{w:?} {now} +{later}"
                    );
                }
            }
        }
        // The longest window of each granularity reaches exactly that far.
        assert_eq!(
            Window::Hour.buckets(60_000 * 100),
            Some((Gran::Minute, 60_000 * 41))
        );
        assert_eq!(
            Window::Week.buckets(3_600_000 * 200),
            Some((Gran::Hour, 3_600_000 * 33))
        );
    }
}
