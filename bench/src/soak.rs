//! `soak`: a steady query load on a loaded serving layer for a long span, sampled every
//! interval: the answers' latency (p50, p99, measured from each request's scheduled time, so a
//! stalled server shows as latency instead of fewer requests), the rate achieved, errors, and
//! the server's resident memory. First a closed loop as fast as `connections` clients go
//! measures the maximum; the soak then offers `fraction` of it.
//!
//! Requests are spread as a web app's are: every one another item, user or device, uniformly
//! over the keys the generator made, over a mix of the API's read routes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::http::Client;
use crate::Out;

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    #[arg(long)]
    pub url: String,
    /// The serving process, for its resident memory.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Seconds of steady load.
    #[arg(long, default_value_t = 600)]
    pub secs: u64,
    /// Seconds of the closed loop that measures the maximum first.
    #[arg(long, default_value_t = 10)]
    pub max_secs: u64,
    /// The fraction of the maximum offered.
    #[arg(long, default_value_t = 0.8)]
    pub fraction: f64,
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Seconds per sample.
    #[arg(long, default_value_t = 10)]
    pub interval_secs: u64,
    /// Items, users and devices the generator made (`i0..`, `u0..`, `d0..`).
    #[arg(long)]
    pub items: u64,
    #[arg(long)]
    pub users: u64,
    #[arg(long)]
    pub devices: u64,
}

/// splitmix64: a different key per request, without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    }
}

/// One request of the mix: item lookups 35%, user recommendations 20%, item recommendations
/// 10%, windowed top items 15%, trending 5%, a device's health 10%, the fleet 5%.
fn path(rng: &mut Rng, a: &SoakArgs) -> (usize, String) {
    let types = ["view", "purchase", "add_to_cart"];
    let r = rng.below(100);
    let class = CLASSES.iter().position(|&(_, upto)| r < upto).unwrap_or(0);
    let p = match r {
        0..35 => format!("/v1/items/i{}", rng.below(a.items)),
        35..55 => format!("/v1/recommendations/users/u{}", rng.below(a.users)),
        55..65 => format!("/v1/recommendations/items/i{}", rng.below(a.items)),
        65..80 => format!(
            "/v1/insights/top-items?window={}&type={}&limit=10",
            ["1h", "24h", "7d", "all"][rng.below(4) as usize],
            types[rng.below(3) as usize]
        ),
        80..85 => format!(
            "/v1/insights/trending?window=1h&baseline=24h&type={}",
            types[rng.below(3) as usize]
        ),
        85..95 => format!("/v1/devices/d{}/health", rng.below(a.devices)),
        _ => "/v1/devices/health".to_string(),
    };
    (class, p)
}

/// The mix's classes, with the upper end of each one's share of 100.
const CLASSES: [(&str, u64); 7] = [
    ("item", 35),
    ("user_recs", 55),
    ("item_recs", 65),
    ("top_items", 80),
    ("trending", 85),
    ("device", 95),
    ("fleet", 100),
];

/// What one interval saw.
#[derive(Default)]
struct Interval {
    latencies_us: Vec<u64>,
    errors: u64,
    not_found: u64,
    /// Per class: the time from sending to the answer (no queueing), in µs.
    service_us: [Vec<u64>; CLASSES.len()],
}

fn rss_mib(pid: Option<u32>) -> f64 {
    pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

pub async fn run(a: SoakArgs, out: &mut Out) -> Result<()> {
    if a.secs == 0 || a.connections == 0 || !(0.0..=1.0).contains(&a.fraction) {
        bail!("--secs and --connections must be positive, --fraction within 0..1");
    }
    let a = Arc::new(a);
    let sample = Duration::from_secs(a.interval_secs.max(1));

    // The maximum: every client as fast as it goes.
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..a.connections {
        let (a, done, stop) = (a.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = Client::new(&a.url);
            let mut rng = Rng(0x5eed ^ c as u64);
            while !stop.load(Ordering::Relaxed) {
                let (_, p) = path(&mut rng, &a);
                if client.get(&p).await.is_ok_and(|r| r.status < 500) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(a.max_secs.max(1))).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let max_rps = done.load(Ordering::Relaxed) as f64 / a.max_secs.max(1) as f64;
    let target = (max_rps * a.fraction).max(1.0);
    eprintln!(
        "soak: maximum {max_rps:.0} req/s over {} s with {} connections; offering {target:.0} req/s for {} s",
        a.max_secs, a.connections, a.secs
    );

    // The soak: each client on a fixed schedule; latency from the scheduled time.
    let interval = Arc::new(Mutex::new(Interval::default()));
    let started = Instant::now();
    let end = started + Duration::from_secs(a.secs);
    let period = Duration::from_secs_f64(a.connections as f64 / target);
    let mut tasks = Vec::new();
    for c in 0..a.connections {
        let (a, interval) = (a.clone(), interval.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = Client::new(&a.url);
            let mut rng = Rng(0xc0ffee ^ c as u64);
            // Spread the clients' first requests over one period.
            let mut due = started + period.mul_f64(c as f64 / a.connections as f64);
            // Requests still due when the span ends (a server that fell behind) are not sent.
            while due < end && Instant::now() < end {
                tokio::time::sleep_until(due.into()).await;
                let (class, p) = path(&mut rng, &a);
                let sent = Instant::now();
                let r = client.get(&p).await;
                let us = due.elapsed().as_micros() as u64;
                if let Ok(mut i) = interval.lock() {
                    i.latencies_us.push(us);
                    i.service_us[class].push(sent.elapsed().as_micros() as u64);
                    match r {
                        Ok(r) if r.status == 404 => i.not_found += 1,
                        Ok(r) if r.status < 400 => {}
                        _ => i.errors += 1,
                    }
                }
                due += period;
            }
        }));
    }
    let (mut p99s, mut rss, mut rates) = (Vec::new(), Vec::new(), Vec::new());
    let (mut errors, mut not_found, mut requests) = (0u64, 0u64, 0u64);
    let mut service: [Vec<u64>; CLASSES.len()] = Default::default();
    let mut at = started;
    while at < end {
        let next = (at + sample).min(end);
        tokio::time::sleep_until(next.into()).await;
        let secs = next.duration_since(at).as_secs_f64();
        at = next;
        let mut i = match interval.lock() {
            Ok(mut i) => std::mem::take(&mut *i),
            Err(_) => bail!("a client panicked"),
        };
        i.latencies_us.sort_unstable();
        let (p50, p99) = (
            percentile(&i.latencies_us, 0.5),
            percentile(&i.latencies_us, 0.99),
        );
        let m = rss_mib(a.pid);
        let rate = i.latencies_us.len() as f64 / secs;
        requests += i.latencies_us.len() as u64;
        for (all, v) in service.iter_mut().zip(&i.service_us) {
            all.extend_from_slice(v);
        }
        errors += i.errors;
        not_found += i.not_found;
        let t = started.elapsed().as_secs();
        eprintln!(
            "soak: {t:>4}/{} s {rate:.0} req/s p50 {p50:.2} ms p99 {p99:.2} ms errors {} 404 {} rss {m:.1} MiB, ETA {} s",
            a.secs,
            i.errors,
            i.not_found,
            a.secs.saturating_sub(t)
        );
        if secs >= sample.as_secs_f64() * 0.5 {
            p99s.push(p99);
            rss.push(m);
            rates.push(rate);
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    // Growth: the last third of the samples against the middle third (the first is warm-up:
    // the kept answers fill, up to their bound).
    let n = p99s.len();
    let third = (n / 3).max(1);
    let (mid, last) = if n >= 3 {
        (third..2 * third, n - third..n)
    } else {
        (0..n.min(1), n.saturating_sub(1)..n)
    };
    out.num("max_rps", max_rps);
    out.num("target_rps", target);
    out.num("achieved_rps", requests as f64 / a.secs as f64);
    out.num("requests", requests as f64);
    out.num("errors", errors as f64);
    out.num("not_found", not_found as f64);
    out.num("samples", n as f64);
    out.num("p99_ms_mid", mean(&p99s[mid.clone()]));
    out.num("p99_ms_last", mean(&p99s[last.clone()]));
    out.num("p99_ms_max", p99s.iter().cloned().fold(f64::NAN, f64::max));
    out.num("rss_mib_mid", mean(&rss[mid]));
    out.num("rss_mib_last", mean(&rss[last]));
    out.num("rss_mib_max", rss.iter().cloned().fold(f64::NAN, f64::max));
    out.num("rate_min", rates.iter().cloned().fold(f64::NAN, f64::min));
    for ((name, _), v) in CLASSES.iter().zip(service.iter_mut()) {
        v.sort_unstable();
        out.num(&format!("service_p50_ms.{name}"), percentile(v, 0.5));
        out.num(&format!("service_p99_ms.{name}"), percentile(v, 0.99));
    }
    Ok(())
}
