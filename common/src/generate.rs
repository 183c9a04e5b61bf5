//! A seeded, realistic event stream for demos, load and tests.
//!
//! Users browse items in sessions (view -> add to cart -> purchase, sometimes a rating), items
//! have categories, prices and skewed popularity, devices send heartbeats and readings. About 3%
//! of events are late (event time up to an hour behind), 1% are re-sent copies of a recent event
//! (same id, key and bytes), and 0.5% are malformed in assorted ways. The same seed and size give
//! the same stream, message for message, so a test can compute the ground truth itself.
//!
//! With `patterns`, it also plants what the insights should find: users who buy `p-a` also buy
//! `p-b`; views of `p-hot` jump in the last tenth of the stream; device `p-quiet` stops sending
//! halfway; device `p-hot` sometimes reads `temp_c` 95 (out of the default bounds).

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::event::{Event, ItemRef, Kind};
use crate::time::Millis;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenConfig {
    pub seed: u64,
    /// Messages to produce, copies and malformed ones included.
    pub count: u64,
    /// Event time of the first event.
    pub start_ts: Millis,
    /// Event time covered by the whole stream.
    pub span_ms: Millis,
    /// Share of messages that are copies of a recent event.
    pub duplicate_rate: f64,
    /// Share of messages that are malformed.
    pub malformed_rate: f64,
    /// Share of events that are late.
    pub late_rate: f64,
    /// Plant known patterns (see the module documentation).
    pub patterns: bool,
}

impl GenConfig {
    pub fn new(seed: u64, count: u64, start_ts: Millis) -> Self {
        GenConfig {
            seed,
            count,
            start_ts,
            span_ms: 2 * 3600 * 1000,
            duplicate_rate: 0.01,
            malformed_rate: 0.005,
            late_rate: 0.03,
            patterns: false,
        }
    }
}

/// What a generated message is.
#[derive(Clone, Debug, PartialEq)]
pub enum Class {
    /// A new event (its first copy).
    Event(Event),
    /// A re-sent copy of the event with this id.
    Copy(String),
    /// A message that is not an event, and why.
    Malformed(&'static str),
}

/// One message to produce.
#[derive(Clone, Debug)]
pub struct Generated {
    pub key: String,
    pub payload: Vec<u8>,
    pub class: Class,
}

const CATEGORIES: [&str; 12] = [
    "books",
    "electronics",
    "garden",
    "toys",
    "kitchen",
    "sports",
    "music",
    "games",
    "beauty",
    "office",
    "pets",
    "travel",
];
const METRICS: [&str; 2] = ["temp_c", "humidity"];

/// The stream, as an iterator of messages.
pub struct Generator {
    cfg: GenConfig,
    rng: StdRng,
    produced: u64,
    next_id: u64,
    users: u64,
    items: Vec<(String, i64)>,
    devices: u64,
    carts: Vec<Vec<u32>>,
    pending: VecDeque<Event>,
    recent: VecDeque<(String, Vec<u8>, String)>,
}

impl Generator {
    pub fn new(cfg: GenConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let users = (cfg.count / 40).clamp(50, 200_000);
        let n_items = (cfg.count / 400).clamp(20, 20_000);
        let devices = (cfg.count / 4_000).clamp(5, 5_000);
        let items = (0..n_items)
            .map(|i| {
                let category = CATEGORIES[(i as usize) % CATEGORIES.len()].to_string();
                let price_cents: i64 = rng.random_range(199..=49_999);
                (category, price_cents)
            })
            .collect();
        Generator {
            rng,
            produced: 0,
            next_id: 0,
            users,
            items,
            devices,
            carts: vec![Vec::new(); users as usize],
            pending: VecDeque::new(),
            recent: VecDeque::new(),
            cfg,
        }
    }

    fn ts(&mut self) -> Millis {
        let n = self.cfg.count.max(1) as f64;
        let base =
            self.cfg.start_ts + (self.produced as f64 / n * self.cfg.span_ms as f64) as Millis;
        if self.rng.random_bool(self.cfg.late_rate) {
            base - self.rng.random_range(1_000..3_600_000)
        } else {
            base
        }
    }

    fn id(&mut self) -> String {
        self.next_id += 1;
        format!("{:x}-{}", self.cfg.seed, self.next_id)
    }

    fn skewed(&mut self, n: u64, power: f64) -> u64 {
        let u: f64 = self.rng.random();
        ((u.powf(power) * n as f64) as u64).min(n - 1)
    }

    fn item_ref(&self, user: u64, item: u32) -> ItemRef {
        ItemRef {
            user: format!("u{user}"),
            item: format!("i{item}"),
            category: Some(self.items[item as usize].0.clone()),
        }
    }

    fn commerce(&mut self) {
        let user = self.skewed(self.users, 1.5);
        let cart = &self.carts[user as usize];
        if !cart.is_empty() && self.rng.random_bool(0.35) {
            let pick = self.rng.random_range(0..cart.len());
            let item = self.carts[user as usize].swap_remove(pick);
            let qty = self.rng.random_range(1..=3);
            let price_micros = self.items[item as usize].1 * 10_000;
            let (id, ts) = (self.id(), self.ts());
            self.pending.push_back(Event {
                id,
                ts,
                kind: Kind::Purchase {
                    item: self.item_ref(user, item),
                    qty,
                    price_micros,
                },
            });
            if self.rng.random_bool(0.2) {
                let rating = self.rng.random_range(1..=5);
                let (id, ts) = (self.id(), self.ts());
                self.pending.push_back(Event {
                    id,
                    ts,
                    kind: Kind::Rating {
                        item: self.item_ref(user, item),
                        rating,
                    },
                });
            }
            return;
        }
        let item = self.skewed(self.items.len() as u64, 2.0) as u32;
        let (id, ts) = (self.id(), self.ts());
        self.pending.push_back(Event {
            id,
            ts,
            kind: Kind::View(self.item_ref(user, item)),
        });
        if self.rng.random_bool(0.3) {
            self.carts[user as usize].push(item);
            let (id, ts) = (self.id(), self.ts());
            self.pending.push_back(Event {
                id,
                ts,
                kind: Kind::AddToCart(self.item_ref(user, item)),
            });
        }
    }

    fn device(&mut self) {
        let device = format!("d{}", self.rng.random_range(0..self.devices));
        let (id, ts) = (self.id(), self.ts());
        let kind = if self.rng.random_bool(0.6) {
            Kind::Heartbeat { device }
        } else {
            let metric = METRICS[self.rng.random_range(0..METRICS.len())].to_string();
            let value = (21.0 + (self.rng.random::<f64>() - 0.5) * 10.0) * 100.0;
            Kind::Reading {
                device,
                metric,
                value: value.round() / 100.0,
            }
        };
        self.pending.push_back(Event { id, ts, kind });
    }

    fn plant(&mut self) {
        let progress = self.produced as f64 / self.cfg.count.max(1) as f64;
        if self.rng.random_bool(0.01) {
            let user = format!("pu{}", self.rng.random_range(0..60));
            for (item, price) in [("p-a", 50_000_000), ("p-b", 20_000_000)] {
                let (id, ts) = (self.id(), self.ts());
                self.pending.push_back(Event {
                    id,
                    ts,
                    kind: Kind::Purchase {
                        item: ItemRef {
                            user: user.clone(),
                            item: item.into(),
                            category: Some("bundles".into()),
                        },
                        qty: 1,
                        price_micros: price,
                    },
                });
            }
        }
        let hot_rate = if progress >= 0.9 { 0.05 } else { 0.0005 };
        if self.rng.random_bool(hot_rate) {
            let user = self.skewed(self.users, 1.0);
            let (id, ts) = (self.id(), self.ts());
            self.pending.push_back(Event {
                id,
                ts,
                kind: Kind::View(ItemRef {
                    user: format!("u{user}"),
                    item: "p-hot".into(),
                    category: Some("toys".into()),
                }),
            });
        }
        if progress < 0.5 && self.rng.random_bool(0.01) {
            let (id, ts) = (self.id(), self.ts());
            self.pending.push_back(Event {
                id,
                ts,
                kind: Kind::Heartbeat {
                    device: "p-quiet".into(),
                },
            });
        }
        if self.rng.random_bool(0.002) {
            let (id, ts) = (self.id(), self.ts());
            self.pending.push_back(Event {
                id,
                ts,
                kind: Kind::Reading {
                    device: "p-hot".into(),
                    metric: "temp_c".into(),
                    value: 95.0,
                },
            });
        }
    }

    fn malformed(&mut self) -> Generated {
        let id = self.id();
        let pick = if self.rng.random_bool(0.001) {
            99
        } else {
            self.rng.random_range(0..11)
        };
        let (reason, payload): (&'static str, Vec<u8>) = match pick {
            99 => (
                "huge payload",
                format!(r#"{{"id":"{id}","pad":"{}"}}"#, "x".repeat(70_000)).into_bytes(),
            ),
            8 => (
                "deep nesting",
                format!(r#"{{"id":"{id}","extra":{}{}}}"#, "[".repeat(300), "]".repeat(300)).into_bytes(),
            ),
            9 => (
                "timestamp far in the future",
                format!(r#"{{"id":"{id}","ts":"2099-01-01T00:00:00Z","type":"heartbeat","device":"d1"}}"#).into_bytes(),
            ),
            10 => ("not an object", b"[1,2,3]".to_vec()),
            0 => ("bad json", format!("{{\"id\":\"{id}\",\"ts\":").into_bytes()),
            1 => (
                "missing id",
                br#"{"ts":"2026-11-25T14:00:00Z","type":"view","user":"u1","item":"i1"}"#.to_vec(),
            ),
            2 => (
                "unknown type",
                format!(r#"{{"id":"{id}","ts":"2026-11-25T14:00:00Z","type":"teleport","user":"u1","item":"i1"}}"#).into_bytes(),
            ),
            3 => (
                "absurd timestamp",
                format!(r#"{{"id":"{id}","ts":"1970-01-01T00:00:00Z","type":"view","user":"u1","item":"i1"}}"#).into_bytes(),
            ),
            4 => (
                "rating out of range",
                format!(r#"{{"id":"{id}","ts":"2026-11-25T14:00:00Z","type":"rating","user":"u1","item":"i1","rating":11}}"#).into_bytes(),
            ),
            5 => (
                "wrong field type",
                format!(r#"{{"id":"{id}","ts":"2026-11-25T14:00:00Z","type":"purchase","user":"u1","item":"i1","qty":"three","price":1}}"#).into_bytes(),
            ),
            6 => ("empty", Vec::new()),
            _ => ("invalid utf-8", b"{\"id\":\"\xff\xfe\xfd\",\"ts\":1,\"type\":\"view\"}".to_vec()),
        };
        Generated {
            key: format!("malformed-{}", self.next_id % 16),
            payload,
            class: Class::Malformed(reason),
        }
    }
}

impl Iterator for Generator {
    type Item = Generated;

    fn next(&mut self) -> Option<Generated> {
        if self.produced >= self.cfg.count {
            return None;
        }
        let out = if self.rng.random_bool(self.cfg.malformed_rate) {
            self.malformed()
        } else if !self.recent.is_empty() && self.rng.random_bool(self.cfg.duplicate_rate) {
            let pick = self.rng.random_range(0..self.recent.len());
            let (key, payload, id) = self.recent[pick].clone();
            Generated {
                key,
                payload,
                class: Class::Copy(id),
            }
        } else {
            if self.pending.is_empty() && self.cfg.patterns {
                self.plant();
            }
            if self.pending.is_empty() {
                if self.rng.random_bool(0.2) {
                    self.device();
                } else {
                    self.commerce();
                }
            }
            let event = self.pending.pop_front()?;
            let key = event.entity().to_string();
            let payload = event.to_json().into_bytes();
            self.recent
                .push_back((key.clone(), payload.clone(), event.id.clone()));
            if self.recent.len() > 1_000 {
                self.recent.pop_front();
            }
            Generated {
                key,
                payload,
                class: Class::Event(event),
            }
        };
        self.produced += 1;
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{decode, Rules};

    #[test]
    fn same_seed_same_stream_and_classes_hold() {
        let cfg = GenConfig::new(7, 20_000, 1_795_600_000_000);
        let a: Vec<_> = Generator::new(cfg.clone()).map(|g| g.payload).collect();
        let b: Vec<_> = Generator::new(cfg.clone()).map(|g| g.payload).collect();
        assert_eq!(a, b);
        assert_eq!(a.len(), 20_000);
        let rules = Rules::default();
        let (mut events, mut copies, mut bad) = (0, 0, 0);
        let message_time = Some(crate::time::now_millis());
        for g in Generator::new(cfg) {
            let decoded = decode(&g.payload, message_time, &rules);
            match g.class {
                Class::Event(e) => {
                    events += 1;
                    assert_eq!(decoded.as_ref(), Ok(&e));
                    assert_eq!(g.key, e.entity());
                }
                Class::Copy(id) => {
                    copies += 1;
                    assert_eq!(decoded.map(|e| e.id), Ok(id));
                }
                Class::Malformed(why) => {
                    bad += 1;
                    assert!(decoded.is_err(), "{why} was accepted");
                }
            }
        }
        assert!(
            copies > 100 && bad > 50 && events > 19_000,
            "{events} {copies} {bad}"
        );
    }
}
