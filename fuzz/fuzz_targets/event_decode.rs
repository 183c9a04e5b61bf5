//! Arbitrary bytes through `strata_common::event::decode`, the one gate every Kafka message passes.
//!
//! Input layout: the first byte picks the message timestamp (so seeds stay readable, use the
//! digits `0`-`3`), the rest is the payload:
//! - `b % 4 == 0`: no message timestamp;
//! - `b % 4 == 1`: 2026-11-25T14:00:00Z;
//! - `b % 4 == 2`: the next 8 bytes, little-endian `i64` milliseconds;
//! - `b % 4 == 3`: 2026-11-25T14:00:00Z shifted by the next byte (signed) in hours.
//!
//! Checked: `decode` never panics; an accepted event satisfies the rules `validate` enforces; and
//! it survives its wire form: `decode(event.to_json())` with the same message timestamp gives the
//! same event. The batch layer relies on that: it archives `to_wire()` and re-validates it when it
//! recomputes (batch-layer/src/segment.rs), and the `wire_round_trip` unit test states it.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use strata_common::event::{decode, Event, Kind, Rules, Validation, EVENT_TYPES};
use strata_common::time::Millis;

const BASE_TS: Millis = 1_795_615_200_000; // 2026-11-25T14:00:00Z

fn rules() -> &'static Rules {
    static RULES: OnceLock<Rules> = OnceLock::new();
    RULES.get_or_init(|| {
        Validation::default()
            .rules()
            .expect("default rules are valid")
    })
}

fn split(data: &[u8]) -> (Option<Millis>, &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return (None, data);
    };
    match mode % 4 {
        0 => (None, rest),
        1 => (Some(BASE_TS), rest),
        2 if rest.len() >= 8 => {
            let (ts, payload) = rest.split_at(8);
            let ts = i64::from_le_bytes(ts.try_into().expect("8 bytes"));
            (Some(ts), payload)
        }
        3 if !rest.is_empty() => {
            let hours = i64::from(rest[0] as i8);
            (Some(BASE_TS + hours * 3_600_000), &rest[1..])
        }
        _ => (None, rest),
    }
}

fn check_ident(name: &str, v: &str, rules: &Rules) {
    assert!(!v.is_empty(), "{name} is empty");
    assert!(v.len() <= rules.max_id_bytes, "{name} is too long");
    assert!(
        !v.chars().any(char::is_control),
        "{name} has control characters"
    );
}

fn check_rules(e: &Event, message_ts: Option<Millis>, rules: &Rules) {
    assert!(EVENT_TYPES.contains(&e.type_name()));
    check_ident("id", &e.id, rules);
    assert!(e.ts >= rules.min_ts, "ts before min_ts: {e:?}");
    if let Some(mts) = message_ts {
        assert!(
            e.ts <= mts.saturating_add(rules.max_future_ms),
            "ts too far ahead: {e:?}"
        );
    }
    let item_ref = |r: &strata_common::event::ItemRef| {
        check_ident("user", &r.user, rules);
        check_ident("item", &r.item, rules);
        if let Some(c) = &r.category {
            check_ident("category", c, rules);
        }
    };
    match &e.kind {
        Kind::View(r) | Kind::AddToCart(r) => item_ref(r),
        Kind::Purchase {
            item,
            qty,
            price_micros,
        } => {
            item_ref(item);
            assert!((1..=10_000).contains(qty));
            assert!((0..=10_000_000_000_000).contains(price_micros));
        }
        Kind::Rating { item, rating } => {
            item_ref(item);
            assert!((1..=5).contains(rating));
        }
        Kind::Heartbeat { device } => check_ident("device", device, rules),
        Kind::Reading {
            device,
            metric,
            value,
        } => {
            check_ident("device", device, rules);
            check_ident("metric", metric, rules);
            assert!(value.is_finite());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let rules = rules();
    let (message_ts, payload) = split(data);
    let Ok(event) = decode(payload, message_ts, rules) else {
        return;
    };
    check_rules(&event, message_ts, rules);
    let json = event.to_json();
    match decode(json.as_bytes(), message_ts, rules) {
        Ok(again) => assert_eq!(again, event, "the wire form {json} decodes differently"),
        Err(r) => panic!("accepted event {event:?} re-encodes as {json}, which is rejected: {r}"),
    }
});
