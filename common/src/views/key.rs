//! View keys: what a partial aggregate is about, and their byte encoding.
//!
//! The encoding starts with a tag byte per view, then fixed-width fields, then names, so the keys
//! of one view (and of one time granularity within it) are contiguous and sorted by time.
//! Names cannot contain control characters (validation rejects them), so `\0` separates two names.

use serde::{Deserialize, Serialize};

use super::Name;
use crate::time::Millis;

/// Time-bucket granularities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Gran {
    Minute,
    Hour,
    Day,
}

impl Gran {
    pub const ALL: [Gran; 3] = [Gran::Minute, Gran::Hour, Gran::Day];

    pub fn millis(self) -> Millis {
        match self {
            Gran::Minute => 60_000,
            Gran::Hour => 3_600_000,
            Gran::Day => 86_400_000,
        }
    }

    /// The start of the bucket holding `ts`.
    pub fn floor(self, ts: Millis) -> Millis {
        ts.div_euclid(self.millis()) * self.millis()
    }

    pub fn parse(s: &str) -> Option<Gran> {
        match s {
            "minute" => Some(Gran::Minute),
            "hour" => Some(Gran::Hour),
            "day" => Some(Gran::Day),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            Gran::Minute => 1,
            Gran::Hour => 2,
            Gran::Day => 3,
        }
    }

    fn from_code(c: u8) -> Option<Gran> {
        match c {
            1 => Some(Gran::Minute),
            2 => Some(Gran::Hour),
            3 => Some(Gran::Day),
            _ => None,
        }
    }
}

/// Which interactions make a user's history for co-occurrence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Basis {
    View,
    Purchase,
}

impl Basis {
    /// Every basis, in the order of [`Basis::index`].
    pub const ALL: [Basis; 2] = [Basis::View, Basis::Purchase];

    /// A number from 0, for what is kept per basis in arrays.
    pub fn index(self) -> usize {
        match self {
            Basis::View => 0,
            Basis::Purchase => 1,
        }
    }

    pub fn parse(s: &str) -> Option<Basis> {
        match s {
            "view" => Some(Basis::View),
            "purchase" => Some(Basis::Purchase),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            Basis::View => 1,
            Basis::Purchase => 2,
        }
    }

    fn from_code(c: u8) -> Option<Basis> {
        match c {
            1 => Some(Basis::View),
            2 => Some(Basis::Purchase),
            _ => None,
        }
    }
}

/// What a partial aggregate is about. The variant decides the partial's type.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ViewKey {
    /// All-time totals of one item: `ItemStats`.
    Item(Name),
    /// Liveness and reading statistics of one device: `DeviceStats`.
    Device(Name),
    /// One item's totals in one time bucket: `ItemStats`.
    ItemSeries {
        gran: Gran,
        start: Millis,
        item: Name,
    },
    /// Everything in one time bucket: `SeriesStats`.
    Series { gran: Gran, start: Millis },
    /// Distinct users of one item on one day: `Hll`.
    ItemDayUsers { day: Millis, item: Name },
    /// A user's items with the time of the latest interaction: `Recent`.
    UserItems { basis: Basis, user: Name },
    /// An item's users: `Set`.
    ItemUsers { basis: Basis, item: Name },
    /// One device's readings of one metric in one hour: `DeviceStats`.
    DeviceMetricHour {
        start: Millis,
        device: Name,
        metric: Name,
    },
}

/// Tag bytes: the first byte of every encoded key.
pub mod tag {
    pub const ITEM: u8 = 1;
    pub const DEVICE: u8 = 2;
    pub const ITEM_SERIES: u8 = 3;
    pub const SERIES: u8 = 4;
    pub const ITEM_DAY_USERS: u8 = 5;
    pub const USER_ITEMS: u8 = 6;
    pub const ITEM_USERS: u8 = 7;
    pub const DEVICE_METRIC_HOUR: u8 = 8;
}

fn time_bytes(t: Millis) -> [u8; 8] {
    ((t as u64) ^ (1 << 63)).to_be_bytes()
}

fn time_from(b: &[u8]) -> Option<Millis> {
    let arr: [u8; 8] = b.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(arr) ^ (1 << 63)) as Millis)
}

fn text(b: &[u8]) -> Option<Name> {
    std::str::from_utf8(b).ok().map(Name::from)
}

impl ViewKey {
    pub fn tag(&self) -> u8 {
        match self {
            ViewKey::Item(_) => tag::ITEM,
            ViewKey::Device(_) => tag::DEVICE,
            ViewKey::ItemSeries { .. } => tag::ITEM_SERIES,
            ViewKey::Series { .. } => tag::SERIES,
            ViewKey::ItemDayUsers { .. } => tag::ITEM_DAY_USERS,
            ViewKey::UserItems { .. } => tag::USER_ITEMS,
            ViewKey::ItemUsers { .. } => tag::ITEM_USERS,
            ViewKey::DeviceMetricHour { .. } => tag::DEVICE_METRIC_HOUR,
        }
    }

    pub fn tag_of_items() -> u8 {
        tag::ITEM
    }

    /// The prefix shared by all keys of a series view at one granularity.
    pub fn series_prefix(tag: u8, gran: Gran) -> Vec<u8> {
        vec![tag, gran.code()]
    }

    /// The first key of a series view at one granularity from time `from` on.
    pub fn series_from(tag: u8, gran: Gran, from: Millis) -> Vec<u8> {
        let mut out = Self::series_prefix(tag, gran);
        out.extend_from_slice(&time_bytes(from));
        out
    }

    /// The first key of a view whose first field is a time (`ItemDayUsers`,
    /// `DeviceMetricHour`) from time `from` on.
    pub fn timed_from(tag: u8, from: Millis) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&time_bytes(from));
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoded key to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.tag());
        match self {
            ViewKey::Item(s) | ViewKey::Device(s) => out.extend_from_slice(s.as_bytes()),
            ViewKey::ItemSeries { gran, start, item } => {
                out.push(gran.code());
                out.extend_from_slice(&time_bytes(*start));
                out.extend_from_slice(item.as_bytes());
            }
            ViewKey::Series { gran, start } => {
                out.push(gran.code());
                out.extend_from_slice(&time_bytes(*start));
            }
            ViewKey::ItemDayUsers { day, item } => {
                out.extend_from_slice(&time_bytes(*day));
                out.extend_from_slice(item.as_bytes());
            }
            ViewKey::UserItems { basis, user: name } | ViewKey::ItemUsers { basis, item: name } => {
                out.push(basis.code());
                out.extend_from_slice(name.as_bytes());
            }
            ViewKey::DeviceMetricHour {
                start,
                device,
                metric,
            } => {
                out.extend_from_slice(&time_bytes(*start));
                out.extend_from_slice(device.as_bytes());
                out.push(0);
                out.extend_from_slice(metric.as_bytes());
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<ViewKey> {
        let (&t, rest) = bytes.split_first()?;
        Some(match t {
            tag::ITEM => ViewKey::Item(text(rest)?),
            tag::DEVICE => ViewKey::Device(text(rest)?),
            tag::ITEM_SERIES => ViewKey::ItemSeries {
                gran: Gran::from_code(*rest.first()?)?,
                start: time_from(rest.get(1..)?)?,
                item: text(rest.get(9..)?)?,
            },
            tag::SERIES => ViewKey::Series {
                gran: Gran::from_code(*rest.first()?)?,
                start: time_from(rest.get(1..)?)?,
            },
            tag::ITEM_DAY_USERS => ViewKey::ItemDayUsers {
                day: time_from(rest)?,
                item: text(rest.get(8..)?)?,
            },
            tag::USER_ITEMS => ViewKey::UserItems {
                basis: Basis::from_code(*rest.first()?)?,
                user: text(rest.get(1..)?)?,
            },
            tag::ITEM_USERS => ViewKey::ItemUsers {
                basis: Basis::from_code(*rest.first()?)?,
                item: text(rest.get(1..)?)?,
            },
            tag::DEVICE_METRIC_HOUR => {
                let names = rest.get(8..)?;
                let sep = names.iter().position(|&b| b == 0)?;
                ViewKey::DeviceMetricHour {
                    start: time_from(rest)?,
                    device: text(&names[..sep])?,
                    metric: text(&names[sep + 1..])?,
                }
            }
            _ => return None,
        })
    }
}
