//! Watching the speed layer's state through the serving layer's `GET /v1/status` (`speed.offsets`
//! are the offsets written to RocksDB with the state, in one batch): until it reaches the topic's
//! end, or a number of messages.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;

use crate::http::Client;
use crate::{elapsed_since, Out};

pub struct WatchArgs {
    pub url: String,
    /// Wait for these offsets, partition by partition...
    pub ends: Option<BTreeMap<i32, i64>>,
    /// ...or for this many messages in all.
    pub until_sum: Option<i64>,
    pub started_at_ns: u128,
    pub poll: Duration,
    pub timeout: Duration,
    /// The process whose state is watched: stop as soon as it has exited.
    pub pid: Option<u32>,
    pub label: String,
}

/// The speed offsets and counters of one `/v1/status` answer.
struct Seen {
    secs: f64,
    offsets: BTreeMap<i32, i64>,
    events: Value,
}

impl Seen {
    fn sum(&self) -> i64 {
        self.offsets.values().sum()
    }
}

fn offsets_json(o: &BTreeMap<i32, i64>) -> String {
    let m: serde_json::Map<String, Value> = o
        .iter()
        .map(|(p, v)| (p.to_string(), Value::from(*v)))
        .collect();
    Value::Object(m).to_string()
}

/// Whether the process has exited (gone, or a zombie not yet reaped).
pub fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
    }
}

async fn status(client: &mut Client, started_at_ns: u128) -> Option<Seen> {
    let r = client.get("/v1/status").await.ok()?;
    let secs = elapsed_since(started_at_ns);
    if r.status != 200 {
        return None;
    }
    let v = r.json().ok()?;
    let offsets = v["speed"]["offsets"]
        .as_object()?
        .iter()
        .filter_map(|(p, o)| Some((p.parse().ok()?, o.as_i64()?)))
        .collect();
    Some(Seen {
        secs,
        offsets,
        events: v["speed"]["events"].clone(),
    })
}

pub async fn watch(args: WatchArgs, out: &mut Out) -> Result<()> {
    let mut client = Client::new(&args.url);
    let target: i64 = match (&args.ends, args.until_sum) {
        (Some(ends), _) => ends.values().sum(),
        (None, Some(n)) => n,
        (None, None) => bail!("nothing to wait for"),
    };
    let done = |s: &Seen| match &args.ends {
        Some(ends) => ends
            .iter()
            .all(|(p, &end)| s.offsets.get(p).copied().unwrap_or(0) >= end),
        None => s.sum() >= target,
    };
    let started = Instant::now();
    let mut first: Option<(f64, BTreeMap<i32, i64>)> = None;
    let mut last_log = Instant::now();
    let mut last_sum = 0i64;
    let mut last_log_sum = 0i64;
    let mut polls = 0u64;
    let mut min_sum: Option<i64> = None;
    loop {
        polls += 1;
        if let Some(seen) = status(&mut client, args.started_at_ns).await {
            if first.is_none() && !seen.offsets.is_empty() {
                first = Some((seen.secs, seen.offsets.clone()));
            }
            last_sum = seen.sum();
            if !seen.offsets.is_empty() {
                min_sum = Some(min_sum.map_or(last_sum, |m| m.min(last_sum)));
            }
            if done(&seen) {
                out.num("secs", seen.secs);
                out.num("sum", seen.sum() as f64);
                out.text("offsets", &offsets_json(&seen.offsets));
                if let Some((secs, offsets)) = &first {
                    out.num("first_secs", *secs);
                    out.num("first_sum", offsets.values().sum::<i64>() as f64);
                    out.text("first_offsets", &offsets_json(offsets));
                }
                for k in ["accepted", "rejected", "duplicates"] {
                    out.num(k, seen.events[k].as_f64().unwrap_or(-1.0));
                }
                // The lowest the stored offsets were seen at: below an earlier reading means the
                // state went back.
                out.num("min_sum", min_sum.unwrap_or(0) as f64);
                out.num("polls", polls as f64);
                return Ok(());
            }
        }
        if let Some(pid) = args.pid {
            if exited(pid) {
                bail!(
                    "{}: process {pid} exited before reaching {target} ({last_sum} so far)",
                    args.label
                );
            }
        }
        if started.elapsed() >= args.timeout {
            bail!(
                "{}: not at {target} after {:?} ({last_sum} so far)",
                args.label,
                args.timeout
            );
        }
        if last_log.elapsed() >= Duration::from_secs(2) {
            let secs = last_log.elapsed().as_secs_f64();
            eprintln!(
                "[{}] {last_sum}/{target} messages in the speed state, {:.0}/s",
                args.label,
                (last_sum - last_log_sum) as f64 / secs
            );
            last_log = Instant::now();
            last_log_sum = last_sum;
        }
        tokio::time::sleep(args.poll).await;
    }
}
