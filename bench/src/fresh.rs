//! Freshness: events produced at a steady rate, each for an item no other event names; for a
//! sample of them, the time from the produce call until `GET /v1/items/{item}` answers 200. The
//! peer: a bare consumer reading the same topic from its end, timing when each sampled event
//! arrives, on the same clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::http::Client;
use crate::Out;

/// Sampled events not yet seen by the peer consumer (id -> when produced), and the milliseconds
/// it took for those it has seen.
#[derive(Default)]
struct PeerState {
    pending: HashMap<String, Instant>,
    seen_ms: Vec<f64>,
}

/// The peer: reads every partition from `ends` (the topic's end before producing) until `stop`,
/// timing the sampled events it finds.
fn peer_consumer(
    brokers: &str,
    topic: &str,
    ends: &BTreeMap<i32, i64>,
    state: Arc<Mutex<PeerState>>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let c = crate::kafka::consumer(brokers)?;
    let mut tpl = TopicPartitionList::new();
    for (&p, &o) in ends {
        tpl.add_partition_offset(topic, p, Offset::Offset(o))?;
    }
    c.assign(&tpl).context("assigning the partitions")?;
    let handle = std::thread::Builder::new()
        .name("peer-consumer".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(Ok(m)) = c.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let at = Instant::now();
                // Payloads are written below: `{"id":"<id>",...`.
                let id = m
                    .payload()
                    .and_then(|p| p.strip_prefix(br#"{"id":""#))
                    .and_then(|p| p.split(|&b| b == b'"').next())
                    .and_then(|id| std::str::from_utf8(id).ok());
                if let (Some(id), Ok(mut s)) = (id, state.lock()) {
                    if let Some(t0) = s.pending.remove(id) {
                        s.seen_ms.push(at.duration_since(t0).as_secs_f64() * 1e3);
                    }
                }
            }
        })
        .context("starting the peer consumer")?;
    Ok(handle)
}

pub struct FreshArgs {
    pub brokers: String,
    pub topic: String,
    pub url: String,
    pub rate: u64,
    pub secs: u64,
    /// One event in `sample` is probed.
    pub sample: u64,
    /// The shortest wait between two polls of one probe; a probe waits a tenth of its age if
    /// that is longer, so that slow answers do not multiply the requests (each measurement is
    /// within 10 % or `poll` of the truth, whichever is more).
    pub poll: Duration,
    /// A probe not visible after this long counts as a timeout.
    pub patience: Duration,
    pub linger_ms: u64,
}

/// What one probe saw: milliseconds from the produce call to the broker's acknowledgement and to
/// the first 200 answer (`None`: not acknowledged, or not visible in time).
struct Probe {
    ack_ms: Option<f64>,
    visible_ms: Option<f64>,
}

/// Idle connections to the serving layer, shared by the probes.
type Pool = Arc<Mutex<Vec<Client>>>;

fn take(pool: &Pool, url: &str) -> Client {
    pool.lock()
        .ok()
        .and_then(|mut v| v.pop())
        .unwrap_or_else(|| Client::new(url))
}

fn give(pool: &Pool, c: Client) {
    if let Ok(mut v) = pool.lock() {
        v.push(c);
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub async fn run(args: FreshArgs, out: &mut Out) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("linger.ms", args.linger_ms.to_string())
        .set("compression.type", "none")
        .create()
        .context("creating the producer")?;
    let total = args.rate * args.secs;
    let sample = args.sample.max(1);
    // Item ids no earlier run used.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let pool: Pool = Arc::new(Mutex::new(Vec::new()));
    let ends = {
        let (brokers, topic) = (args.brokers.clone(), args.topic.clone());
        tokio::task::spawn_blocking(move || crate::kafka::end_offsets(&brokers, &topic)).await??
    };
    let requests = Arc::new(AtomicU64::new(0));
    let peer = Arc::new(Mutex::new(PeerState::default()));
    let stop_peer = Arc::new(AtomicBool::new(false));
    let peer_thread = peer_consumer(
        &args.brokers,
        &args.topic,
        &ends,
        peer.clone(),
        stop_peer.clone(),
    )?;
    let mut probes = Vec::new();
    let mut failed_sends = 0u64;
    eprintln!(
        "[freshness] producing {total} events at {}/s for {} s, probing 1 in {sample}",
        args.rate, args.secs
    );
    let started = Instant::now();
    let mut last_log = Instant::now();
    let mut i = 0u64;
    while i < total {
        let due = ((started.elapsed().as_secs_f64() * args.rate as f64) as u64 + 1).min(total);
        while i < due {
            let item = format!("fr{nonce:x}-{i}");
            let user = format!("fu{}", i % 997);
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let payload = format!(
                r#"{{"id":"{item}","ts":{ts},"type":"view","user":"{user}","item":"{item}","category":"books"}}"#
            );
            let probe = i.is_multiple_of(sample);
            let t0 = Instant::now();
            if probe {
                if let Ok(mut p) = peer.lock() {
                    p.pending.insert(item.clone(), t0);
                }
            }
            let mut record = FutureRecord::to(&args.topic)
                .key(user.as_str())
                .payload(payload.as_str());
            let delivery = loop {
                match producer.send_result(record) {
                    Ok(d) => break Some(d),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => {
                        if failed_sends == 0 {
                            eprintln!("[freshness] produce failed: {e}");
                        }
                        failed_sends += 1;
                        break None;
                    }
                }
            };
            if let (Some(delivery), true) = (delivery, probe) {
                let pool = pool.clone();
                let (url, poll, patience) = (args.url.clone(), args.poll, args.patience);
                let requests = requests.clone();
                probes.push(tokio::spawn(async move {
                    let ack = async {
                        match delivery.await {
                            Ok(Ok(_)) => Some(t0.elapsed().as_secs_f64() * 1e3),
                            _ => None,
                        }
                    };
                    let visible = async {
                        let path = format!("/v1/items/{item}");
                        let mut client = take(&pool, &url);
                        let seen = loop {
                            requests.fetch_add(1, Ordering::Relaxed);
                            if let Ok(r) = client.get(&path).await {
                                if r.status == 200 {
                                    break Some(t0.elapsed().as_secs_f64() * 1e3);
                                }
                            }
                            if t0.elapsed() >= patience {
                                break None;
                            }
                            tokio::time::sleep(poll.max(t0.elapsed() / 10)).await;
                        };
                        give(&pool, client);
                        seen
                    };
                    let (ack_ms, visible_ms) = tokio::join!(ack, visible);
                    Probe { ack_ms, visible_ms }
                }));
            }
            i += 1;
        }
        if last_log.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "[freshness] {i}/{total} produced, {} probes started",
                probes.len()
            );
            last_log = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let send_secs = started.elapsed().as_secs_f64();
    let flushed = {
        let p = producer.clone();
        tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(120))).await?
    };
    let acked_secs = started.elapsed().as_secs_f64();
    if let Err(e) = flushed {
        eprintln!("[freshness] not every event was acknowledged: {e}");
    }
    eprintln!(
        "[freshness] produced {total} in {send_secs:.1} s; waiting for {} probes",
        probes.len()
    );
    let mut visible = Vec::new();
    let mut acks = Vec::new();
    let mut timeouts = 0u64;
    let n_probes = probes.len();
    for p in probes {
        let p = p.await?;
        match p.visible_ms {
            Some(ms) => visible.push(ms),
            None => timeouts += 1,
        }
        if let Some(ms) = p.ack_ms {
            acks.push(ms);
        }
    }
    stop_peer.store(true, Ordering::Relaxed);
    if peer_thread.join().is_err() {
        eprintln!("[freshness] the peer consumer panicked");
    }
    let mut raw = peer.lock().map(|p| p.seen_ms.clone()).unwrap_or_default();
    raw.sort_by(f64::total_cmp);
    visible.sort_by(f64::total_cmp);
    acks.sort_by(f64::total_cmp);
    out.num("events", total as f64);
    out.num("failed_sends", failed_sends as f64);
    out.num("send_secs", send_secs);
    out.num("rate_sent", total as f64 / send_secs);
    out.num("rate_acked", total as f64 / acked_secs);
    out.num("probes", n_probes as f64);
    out.num("visible", visible.len() as f64);
    out.num("timeouts", timeouts as f64);
    out.num("p50_ms", percentile(&visible, 0.50));
    out.num("p90_ms", percentile(&visible, 0.90));
    out.num("p99_ms", percentile(&visible, 0.99));
    out.num("max_ms", visible.last().copied().unwrap_or(f64::NAN));
    out.num("ack_p50_ms", percentile(&acks, 0.50));
    out.num("ack_p99_ms", percentile(&acks, 0.99));
    out.num("raw_seen", raw.len() as f64);
    out.num("raw_p50_ms", percentile(&raw, 0.50));
    out.num("raw_p99_ms", percentile(&raw, 0.99));
    out.num("poll_ms", args.poll.as_secs_f64() * 1e3);
    let probe_secs = started.elapsed().as_secs_f64();
    out.num("probe_requests", requests.load(Ordering::Relaxed) as f64);
    out.num(
        "probe_requests_per_sec",
        requests.load(Ordering::Relaxed) as f64 / probe_secs,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
