//! A serving layer's side of a cluster (decision record 0013): a mirror of the speed tail, in
//! the speed layer's own layout, pulled every 100 ms from the speed instances announced in
//! `<topic>.members`, each partition from the instance that holds it. Queries read the mirror
//! like the state of one speed layer that held every partition; where a partition came from,
//! and what answers lack, is written beside it ([`strata_common::cluster::Sources`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset as KafkaOffset, TopicPartitionList};
use rocksdb::DB;
use strata_common::cluster::{self, Have, InstanceHeader, Member, Source, SourceState, Sources};
use strata_common::config::Config;
use strata_common::handoff::{Offset, Offsets, Partition};
use strata_common::speed_store::{self, encode_i64, meta_key, Cf};
use strata_common::time::{format_rfc3339, now_millis};
use tokio_util::sync::CancellationToken;

/// How often the mirror asks every instance for what it lacks.
const PULL_EVERY: Duration = Duration::from_millis(100);
/// How long one instance's answer may take.
const PULL_TIMEOUT: Duration = Duration::from_secs(2);

/// Opens a new, empty mirror under `<data-dir>/serve/speed-mirror-<pid>`, removing the mirrors
/// of serving processes that are gone.
pub fn open_mirror(cfg: &Config) -> strata_common::Result<(Arc<DB>, PathBuf)> {
    let dir = cfg.data_dir.join("serve");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let gone = name
                .strip_prefix("speed-mirror-")
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
            if gone {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let path = dir.join(format!("speed-mirror-{}", std::process::id()));
    if path.exists() {
        std::fs::remove_dir_all(&path).map_err(|e| strata_common::Error::io(&path, e))?;
    }
    Ok((Arc::new(speed_store::open_primary(&path)?), path))
}

/// One announced instance, and how its last pull went.
struct Tracked {
    member: Member,
    /// Its last answer's header; `None` while it does not answer.
    answer: Option<InstanceHeader>,
    failing_since: Option<i64>,
    next_try: Instant,
}

/// What the mirror needs from the serving layer it feeds, read before every pull.
pub struct Inputs {
    /// The loaded batch version's cutoffs: blocks below them are not pulled.
    pub cutoffs: Box<dyn Fn() -> Offsets + Send>,
    /// The topic's partitions (with their high watermarks) as the broker last reported them.
    pub partitions: Box<dyn Fn() -> Option<Offsets> + Send>,
}

/// The loop that keeps the mirror: reads the members topic, pulls from every member, writes.
pub struct ClusterSync {
    cfg: Config,
    inputs: Inputs,
    mirror: Arc<DB>,
    members: BTreeMap<String, Tracked>,
    /// The instance each partition was last pulled from.
    pulled_from: BTreeMap<Partition, String>,
    /// Since when each partition has not been current (RFC 3339).
    since: BTreeMap<Partition, (SourceState, String)>,
    written: Option<Sources>,
    flushed_at: Option<i64>,
}

impl ClusterSync {
    pub fn new(cfg: Config, inputs: Inputs, mirror: Arc<DB>) -> Self {
        ClusterSync {
            cfg,
            inputs,
            mirror,
            members: BTreeMap::new(),
            pulled_from: BTreeMap::new(),
            since: BTreeMap::new(),
            written: None,
            flushed_at: None,
        }
    }

    /// Runs until `shutdown`. Blocking: run it on a thread of its own.
    pub fn run(mut self, shutdown: CancellationToken) {
        let topic = cluster::members_topic(&self.cfg.kafka.topic);
        let mut consumer: Option<BaseConsumer> = None;
        let mut next_open = Instant::now();
        tracing::info!(members = %topic, "mirroring the speed instances announced in the members topic");
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            if consumer.is_none() && started >= next_open {
                match members_consumer(&self.cfg, &topic) {
                    Ok(c) => consumer = Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the members topic yet; retrying in 5 s");
                        next_open = started + Duration::from_secs(5);
                    }
                }
            }
            if let Some(c) = &consumer {
                self.read_members(c);
            }
            if let Err(e) = self.pull_all() {
                tracing::error!(error = %e, "cannot write the speed mirror");
            }
            std::thread::sleep(PULL_EVERY.saturating_sub(started.elapsed()));
        }
    }

    fn read_members(&mut self, consumer: &BaseConsumer) {
        while let Some(m) = consumer.poll(Duration::ZERO) {
            let msg = match m {
                Ok(msg) => msg,
                Err(e) => {
                    tracing::debug!(error = %e, "members topic");
                    break;
                }
            };
            let Some(id) = msg.key().map(|k| String::from_utf8_lossy(k).to_string()) else {
                continue;
            };
            match msg.payload().map(serde_json::from_slice::<Member>) {
                None => {
                    if self.members.remove(&id).is_some() {
                        tracing::info!(instance = %id, "speed instance left");
                    }
                }
                Some(Ok(member)) => {
                    let known = self
                        .members
                        .get(&id)
                        .is_some_and(|t| t.member.url == member.url);
                    if known {
                        if let Some(t) = self.members.get_mut(&id) {
                            t.member = member;
                        }
                    } else {
                        tracing::info!(instance = %id, url = %member.url, "speed instance announced");
                        self.members.insert(
                            id,
                            Tracked {
                                member,
                                answer: None,
                                failing_since: None,
                                next_try: Instant::now(),
                            },
                        );
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(instance = %id, error = %e, "unreadable members record")
                }
            }
        }
    }

    /// Pulls from every member that is due, then writes where each partition stands.
    fn pull_all(&mut self) -> strata_common::Result<()> {
        let meta = speed_store::read_meta(&self.mirror, &())?;
        let cutoffs = (self.inputs.cutoffs)();
        let mut have: BTreeMap<Partition, Have> = BTreeMap::new();
        let mut kept: BTreeMap<Partition, u64> = BTreeMap::new();
        for (&p, &cutoff) in &cutoffs {
            have.entry(p).or_default().cutoff = cutoff;
        }
        for (&p, m) in &meta.partitions {
            have.entry(p).or_default().next = m.next_offset;
            kept.insert(p, m.first_live_block);
        }
        let block_size = self.cfg.handoff.block_size;
        let now = Instant::now();
        let ids: Vec<String> = self.members.keys().cloned().collect();
        for id in ids {
            let Some(t) = self.members.get_mut(&id) else {
                continue;
            };
            if now < t.next_try {
                continue;
            }
            let path = format!("/v1/speed/sync?have={}", cluster::encode_have(&have));
            let outcome =
                http_get(&t.member.url, &path, PULL_TIMEOUT).and_then(|(status, body)| {
                    if status != 200 {
                        return Err(format!(
                            "answered {status}: {}",
                            String::from_utf8_lossy(&body[..body.len().min(200)])
                        ));
                    }
                    Ok(body)
                });
            let body = match outcome {
                Ok(b) => b,
                Err(e) => {
                    if t.failing_since.is_none() {
                        tracing::warn!(instance = %id, url = %t.member.url, error = %e, "speed instance does not answer");
                        t.failing_since = Some(now_millis());
                    }
                    t.answer = None;
                    t.next_try = now + Duration::from_secs(1);
                    continue;
                }
            };
            let answer = match cluster::decode_sync(&body) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(instance = %id, error = %e, "unreadable answer from a speed instance");
                    t.answer = None;
                    t.failing_since.get_or_insert_with(now_millis);
                    t.next_try = now + Duration::from_secs(1);
                    continue;
                }
            };
            if let Some(bs) = answer.instance.block_size.filter(|&bs| bs != block_size) {
                tracing::error!(instance = %id, block_size = bs, expected = block_size, "speed instance has another handoff.block-size; not mirrored");
                t.answer = None;
                t.failing_since.get_or_insert_with(now_millis);
                t.next_try = now + Duration::from_secs(5);
                continue;
            }
            if t.failing_since.take().is_some() {
                tracing::info!(instance = %id, "speed instance answers again");
            }
            for part in &answer.parts {
                let p = part.partition;
                let h = have.entry(p).or_default();
                if !answer.instance.held.contains(&p) || part.header.next <= h.next {
                    continue;
                }
                cluster::write_part(
                    &self.mirror,
                    block_size,
                    part,
                    kept.get(&p).copied().unwrap_or(0),
                )?;
                h.next = part.header.next;
                kept.insert(p, part.header.first_live_block);
                if self.pulled_from.insert(p, id.clone()).as_ref() != Some(&id) {
                    tracing::info!(partition = p, instance = %id, offset = h.next, "partition pulled from this instance");
                }
            }
            if answer.instance.flushed_at > self.flushed_at {
                self.flushed_at = answer.instance.flushed_at;
                if let Some(at) = self.flushed_at {
                    self.mirror
                        .put_cf(
                            speed_store::cf(&self.mirror, Cf::Meta)?,
                            meta_key::FLUSHED_AT,
                            encode_i64(at),
                        )
                        .map_err(|e| strata_common::Error::rocks("write the speed mirror", e))?;
                }
            }
            t.answer = Some(answer.instance);
        }
        let sources = self.sources(&have);
        if self.written.as_ref() != Some(&sources) {
            cluster::write_sources(&self.mirror, &sources)?;
            self.written = Some(sources);
        }
        Ok(())
    }

    /// Where each partition stands: the topic's partitions, the mirror's and the members'.
    fn sources(&mut self, have: &BTreeMap<Partition, Have>) -> Sources {
        let mut partitions: BTreeSet<Partition> = have.keys().copied().collect();
        partitions.extend((self.inputs.partitions)().unwrap_or_default().keys());
        for t in self.members.values() {
            partitions.extend(t.answer.iter().flat_map(|a| a.held.iter()));
        }
        let mut out = Sources::new();
        for p in partitions {
            let mirrored = have.get(&p).map_or(0, |h| h.next);
            let holder = self
                .members
                .iter()
                .filter_map(|(id, t)| {
                    let a = t.answer.as_ref()?;
                    a.held
                        .contains(&p)
                        .then(|| (a.next.get(&p).copied().unwrap_or(0), id))
                })
                .max();
            let (state, instance, instance_offset): (SourceState, Option<String>, Option<Offset>) =
                match holder {
                    Some((next, id)) if next >= mirrored => {
                        (SourceState::Current, Some(id.clone()), Some(next))
                    }
                    Some((next, id)) => (SourceState::Rebuilding, Some(id.clone()), Some(next)),
                    None => {
                        let last = self.pulled_from.get(&p).cloned();
                        let failing = last
                            .as_ref()
                            .and_then(|id| self.members.get(id))
                            .is_some_and(|t| t.failing_since.is_some());
                        if failing {
                            (SourceState::Unreachable, last, None)
                        } else {
                            (SourceState::Unassigned, last, None)
                        }
                    }
                };
            let since = if state == SourceState::Current {
                self.since.remove(&p);
                None
            } else {
                let entry = self
                    .since
                    .entry(p)
                    .or_insert_with(|| (state.clone(), format_rfc3339(now_millis())));
                if entry.0 != state {
                    *entry = (state.clone(), format_rfc3339(now_millis()));
                }
                Some(entry.1.clone())
            };
            out.insert(
                p,
                Source {
                    state,
                    instance,
                    instance_offset,
                    since,
                },
            );
        }
        out
    }
}

/// A consumer of the members topic from its beginning (no group: nothing is committed).
fn members_consumer(cfg: &Config, topic: &str) -> strata_common::Result<BaseConsumer> {
    let consumer: BaseConsumer = strata_common::kafka::client_config(&cfg.kafka)
        .set(
            "group.id",
            format!("strata-serve-members-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| strata_common::Error::kafka("create the members consumer", e))?;
    // One partition as created here; every partition of one created otherwise.
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .map_err(|e| strata_common::Error::kafka("metadata of the members topic", e))?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), KafkaOffset::Beginning)
                .map_err(|e| strata_common::Error::kafka("assign the members topic", e))?;
        }
    }
    if tpl.count() == 0 {
        return Err(strata_common::Error::Other(format!(
            "topic {topic} not found"
        )));
    }
    consumer
        .assign(&tpl)
        .map_err(|e| strata_common::Error::kafka("assign the members topic", e))?;
    Ok(consumer)
}

/// A blocking `GET` of `path` from `url` (`http://host:port`), over one connection, within
/// `timeout` for connecting and for each read; the status and the body.
pub fn http_get(url: &str, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>), String> {
    let host = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?} is not an http:// URL"))?
        .trim_end_matches('/');
    let addr = host
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{host}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{host}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("{host}: {e}"))?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{host}: no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = raw[end + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("{host}: no status"))?;
    if head.contains("transfer-encoding: chunked") {
        return Err(format!("{host}: chunked answers are not read"));
    }
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    if length.is_some_and(|n| n != body.len()) {
        return Err(format!("{host}: answer cut short"));
    }
    Ok((status, body))
}
