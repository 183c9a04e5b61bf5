//! What a batch version no longer holds because of retention, and how the API and `strata
//! verify` tell it.
//!
//! Two settings take data away (`retention.*` in [`crate::config`]):
//!
//! - **Rollups.** Heartbeats and readings older than `retention.<type>.rollup-after-days` are
//!   kept as one record per device (and metric) and hour ([`crate::views::Rollup`]). Every view
//!   is unchanged by it but one: the minute buckets of the series view, which an hour's record
//!   cannot split. A version built from rolled-up data holds no series minute bucket before the
//!   rollup threshold (`series_minute_from`).
//! - **Time to live of minute buckets.** With `retention.minute-series-days` set, a version holds
//!   no minute bucket (series and item series) that starts before that many days before its
//!   recompute (`item_minute_from`, and `series_minute_from` when later).
//!
//! Hours, days, totals, device statistics and co-occurrence are kept whole.

use serde::{Deserialize, Serialize};

use crate::time::Millis;
use crate::views::{Gran, ViewKey};

/// The first minute bucket a version holds, per view, when retention took older ones away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marks {
    /// The series view's minute buckets start here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series_minute_from: Option<Millis>,
    /// The item series view's minute buckets start here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_minute_from: Option<Millis>,
}

impl Marks {
    pub fn is_empty(&self) -> bool {
        self.series_minute_from.is_none() && self.item_minute_from.is_none()
    }

    /// Whether a version under these marks holds `key` at all.
    pub fn keeps(&self, key: &ViewKey) -> bool {
        let below = |from: Option<Millis>, start: Millis| from.is_some_and(|f| start < f);
        match key {
            ViewKey::Series {
                gran: Gran::Minute,
                start,
            } => !below(self.series_minute_from, *start),
            ViewKey::ItemSeries {
                gran: Gran::Minute,
                start,
                ..
            } => !below(self.item_minute_from, *start),
            _ => true,
        }
    }

    /// The later of each mark: what neither of two states holds.
    pub fn union(self, other: Marks) -> Marks {
        let later = |a: Option<Millis>, b: Option<Millis>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Marks {
            series_minute_from: later(self.series_minute_from, other.series_minute_from),
            item_minute_from: later(self.item_minute_from, other.item_minute_from),
        }
    }

    /// The first minute bucket a query of `gran` buckets may ask for, over the series view
    /// (`item: false`) or an item's series (`item: true`); `None`: no limit.
    pub fn minute_floor(&self, gran: Gran, item: bool) -> Option<Millis> {
        if gran != Gran::Minute {
            return None;
        }
        if item {
            self.item_minute_from
        } else {
            self.series_minute_from
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::Name;

    #[test]
    fn only_minute_buckets_before_the_marks_are_dropped() {
        let m = Marks {
            series_minute_from: Some(120_000),
            item_minute_from: Some(60_000),
        };
        let series = |gran, start| ViewKey::Series { gran, start };
        let item = |gran, start| ViewKey::ItemSeries {
            gran,
            start,
            item: Name::from("i1"),
        };
        assert!(!m.keeps(&series(Gran::Minute, 60_000)));
        assert!(m.keeps(&series(Gran::Minute, 120_000)));
        assert!(m.keeps(&series(Gran::Hour, 0)));
        assert!(!m.keeps(&item(Gran::Minute, 0)));
        assert!(m.keeps(&item(Gran::Minute, 60_000)));
        assert!(m.keeps(&item(Gran::Day, 0)));
        assert!(m.keeps(&ViewKey::Device(Name::from("d1"))));
        assert!(Marks::default().keeps(&series(Gran::Minute, 0)));
        let later = m.union(Marks {
            series_minute_from: None,
            item_minute_from: Some(180_000),
        });
        assert_eq!(later.series_minute_from, Some(120_000));
        assert_eq!(later.item_minute_from, Some(180_000));
    }
}
