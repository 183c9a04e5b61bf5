//! `strata verify`: recomputes every view from scratch, from the master dataset plus the Kafka
//! tail, and diffs it key by key against what the serving layer merges.
//!
//! The serving layer hands over one consistent snapshot of every merged partial together with
//! the offsets it covers (`GET /v1/admin/views`). Verify replays, per partition, every event below
//! those offsets: the archived ones from the master dataset's segments, the rest straight from
//! the topic, through the same validation and dedupe rule and the same view definitions. Any key
//! whose partial differs, is missing, or is extra is a difference.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, TopicPartitionList};
use serde_json::Value;
use strata_batch::{retention, segment};
use strata_common::config::Config;
use strata_common::dedupe::PartitionDeduper;
use strata_common::event::{decode, Event};
use strata_common::handoff::{Offset, Offsets, Partition};
use strata_common::kafka;
use strata_common::progress::Progress;
use strata_common::views::{Partial, Snapshot, ViewKey, ViewSet};
use tokio_rustls::rustls;

/// How `strata verify` is asked to run.
pub struct VerifyArgs {
    /// Base URL of the serving layer, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Wait until the serving layer covers the topic's high watermarks (as of the start) before
    /// taking the snapshot, at most this long.
    pub wait: Option<Duration>,
    /// Differences printed in full.
    pub show: usize,
    /// PEM certificates trusted for an `https://` URL (default: the system's bundle).
    pub ca_cert: Option<PathBuf>,
}

/// What a verification found.
#[derive(Debug, Default)]
pub struct Report {
    pub from_master: u64,
    pub from_kafka: u64,
    pub rejected_in_tail: u64,
    pub counted: u64,
    pub duplicates: u64,
    pub keys: usize,
    pub differences: Vec<Difference>,
}

/// One key on which the serving layer and the recomputation disagree.
#[derive(Debug)]
pub struct Difference {
    pub key: ViewKey,
    /// The recomputation's partial (`None`: the key should not exist).
    pub expected: Option<Partial>,
    /// The serving layer's partial (`None`: it is missing).
    pub served: Option<Partial>,
}

/// Runs a verification, printing the summary and up to `show` differences.
pub fn run(cfg: &Config, args: &VerifyArgs) -> anyhow::Result<Report> {
    let key = cfg.serve.admin_key.as_deref().context(
        "verify reads the serving layer's admin route: set --admin-key or STRATA_ADMIN_KEY",
    )?;
    let base = Url::parse(&args.url, key, args.ca_cert.as_deref())?;
    if let Some(wait) = args.wait {
        wait_for_coverage(cfg, &base, wait)?;
    }
    let started = Instant::now();
    let (status, body) = base.get("/v1/admin/views")?;
    if status != 200 {
        bail!(
            "the serving layer answered {status} to GET /v1/admin/views: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let snapshot = Snapshot::decode(&body).context("the views snapshot does not decode")?;
    eprintln!(
        "verify: snapshot of {} keys covering {:?} (batch version {})",
        snapshot.entries.len(),
        snapshot.coverage,
        snapshot
            .batch_version
            .map_or_else(|| "none".to_string(), |v| v.to_string())
    );
    let skipped = skipped_ranges(&base)?;
    let mut report = Report::default();
    let mut truth = recompute(cfg, &snapshot.coverage, &skipped, &mut report)?;
    // Minute buckets retention took away are held by neither side in full (the speed tail may
    // hold late events' buckets there): both are compared without them.
    let marks = strata_common::batch_store::read_current(&cfg.data_dir)?
        .map(|m| m.retention)
        .unwrap_or_default()
        .union(
            retention::current(&cfg.master_dir())?
                .map(|g| g.marks())
                .unwrap_or_default(),
        );
    let mut served = snapshot.entries;
    if !marks.is_empty() {
        truth.entries.retain(|k, _| marks.keeps(k));
        served.retain(|(k, _)| marks.keeps(k));
        eprintln!("verify: minute buckets before the retention marks ({marks:?}) are left out on both sides");
    }
    report.keys = truth.len().max(served.len());
    report.differences = diff(truth, served);
    println!(
        "verify: replayed {} events ({} from the master dataset, {} from Kafka; {} rejected in the Kafka tail): {} counted, {} duplicates",
        report.from_master + report.from_kafka,
        report.from_master,
        report.from_kafka,
        report.rejected_in_tail,
        report.counted,
        report.duplicates
    );
    for d in report.differences.iter().take(args.show) {
        println!(
            "difference: {:?}\n  recomputed: {}\n  served:     {}",
            d.key,
            shorten(&d.expected),
            shorten(&d.served)
        );
    }
    println!(
        "verify: {} keys compared, {} differences, {:.1} s",
        report.keys,
        report.differences.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(report)
}

fn shorten(p: &Option<Partial>) -> String {
    let s = match p {
        Some(p) => format!("{p:?}"),
        None => "(absent)".into(),
    };
    if s.len() > 400 {
        let cut = (0..=400)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}…", &s[..cut])
    } else {
        s
    }
}

/// Keys that differ between the recomputation and the snapshot, in key order. A key holding the
/// identity counts as absent on either side.
pub fn diff(truth: ViewSet, served: Vec<(ViewKey, Partial)>) -> Vec<Difference> {
    let mut truth = truth.entries;
    let mut out = Vec::new();
    for (key, served) in served {
        let identity = Partial::identity(&key);
        match truth.remove(&key) {
            Some(expected) if expected == served => {}
            Some(expected) => out.push(Difference {
                key,
                expected: Some(expected),
                served: Some(served),
            }),
            None if served == identity => {}
            None => out.push(Difference {
                key,
                expected: None,
                served: Some(served),
            }),
        }
    }
    for (key, expected) in truth {
        if expected != Partial::identity(&key) {
            out.push(Difference {
                key,
                expected: Some(expected),
                served: None,
            });
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// Every view over the events below `coverage`, recomputed from scratch.
fn recompute(
    cfg: &Config,
    coverage: &Offsets,
    skipped: &Skips,
    report: &mut Report,
) -> anyhow::Result<ViewSet> {
    let rules = cfg.validation.rules()?;
    let rule = cfg.dedupe_rule();
    let master = cfg.master_dir();
    let segments = segment::list(&master)?;
    let generation = retention::current(&master)?;
    let mut prefixes: BTreeMap<Partition, retention::Prefix> = BTreeMap::new();
    let mut streams: BTreeMap<Partition, Vec<(Offset, Event)>> = BTreeMap::new();
    let mut tail: Offsets = Offsets::new();
    let total_segments: usize = segments.values().map(Vec::len).sum();
    let mut progress = Progress::new("verify: read master segments", Some(total_segments as u64));
    for (&p, &cov) in coverage {
        let events = streams.entry(p).or_default();
        let mut archived_end: Offset = 0;
        if let Some(g) = &generation {
            if let Some(prefix) = retention::read_prefix(&master, g, p, rule, &rules)? {
                if prefix.upto > cov {
                    bail!("partition {p}: the master dataset's rollup reaches offset {} but the serving layer covers only {cov}; verify again once it has caught up", prefix.upto);
                }
                report.from_master += prefix.events();
                archived_end = prefix.upto;
                prefixes.insert(p, prefix);
            }
        }
        for seg in segments.get(&p).map(Vec::as_slice).unwrap_or_default() {
            progress.inc(1);
            let replaced = prefixes.get(&p).is_some_and(|x| seg.end <= x.upto);
            if seg.start >= cov || replaced {
                continue;
            }
            let read = segment::read(seg, cov, &rules)?;
            report.from_master += read.len() as u64;
            events.extend(read);
            archived_end = seg.end.min(cov);
        }
        if archived_end < cov {
            tail.insert(p, archived_end);
        }
    }
    progress.finish();
    if !tail.is_empty() {
        read_tail(cfg, &tail, coverage, skipped, &mut streams, report)?;
    }
    let mut views = ViewSet::default();
    for (p, events) in streams {
        let mut dedupe = match prefixes.remove(&p) {
            Some(prefix) => {
                report.counted += prefix.events();
                report.duplicates += prefix.duplicates;
                for (_, e) in &prefix.kept {
                    views.fold(e);
                }
                for r in &prefix.rollups {
                    views.fold_rollup(r);
                }
                prefix.dedupe
            }
            None => PartitionDeduper::new(rule),
        };
        for (_, e) in events {
            if dedupe.admit(&e.id, e.ts) {
                views.fold(&e);
                report.counted += 1;
            } else {
                report.duplicates += 1;
            }
        }
    }
    Ok(views)
}

/// Per partition, the offset ranges `[from, to)` the speed layer passed over as undecodable
/// (`kafka.undecodable = "skip"`): they hold no events, and the tail is not read there.
type Skips = BTreeMap<Partition, Vec<(Offset, Offset)>>;

/// The skipped ranges the serving layer's `/v1/status` reports.
fn skipped_ranges(base: &Url) -> anyhow::Result<Skips> {
    let (status, body) = base.get("/v1/status")?;
    if status != 200 {
        bail!(
            "the serving layer answered {status} to GET /v1/status: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let v: Value = serde_json::from_slice(&body).context("/v1/status is not JSON")?;
    let mut out = Skips::new();
    if let Some(parts) = v["speed"]["partitions"].as_object() {
        for (p, m) in parts {
            let p: Partition = p.parse().context("a partition in /v1/status")?;
            for r in m["skipped"].as_array().into_iter().flatten() {
                if let (Some(from), Some(to)) = (r["from"].as_i64(), r["to"].as_i64()) {
                    out.entry(p).or_default().push((from, to));
                }
            }
        }
    }
    Ok(out)
}

/// Where partition `p`'s reading goes on from `next`: past a skipped range that begins there.
fn past_skipped(skipped: &Skips, p: Partition, next: Offset) -> Option<Offset> {
    skipped
        .get(&p)?
        .iter()
        .find(|&&(from, to)| from <= next && next < to)
        .map(|&(_, to)| to)
}

/// Reads `[from[p], coverage[p])` of each partition from the topic.
fn read_tail(
    cfg: &Config,
    from: &Offsets,
    coverage: &Offsets,
    skipped: &Skips,
    streams: &mut BTreeMap<Partition, Vec<(Offset, Event)>>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let rules = cfg.validation.rules()?;
    let consumer: BaseConsumer = kafka::client_config(&cfg.kafka)
        .set("group.id", cfg.consumer_group("verify"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .context("creating the Kafka consumer")?;
    let mut tpl = TopicPartitionList::new();
    let mut next: Offsets = from.clone();
    for (&p, start) in next.iter_mut() {
        if let Some(to) = past_skipped(skipped, p, *start) {
            *start = to;
        }
        tpl.add_partition_offset(&cfg.kafka.topic, p, rdkafka::Offset::Offset(*start))
            .context("assigning partitions")?;
    }
    consumer.assign(&tpl).context("assigning partitions")?;
    let total: i64 = from.iter().map(|(p, &s)| coverage[p] - s).sum();
    let mut progress = Progress::new("verify: read the Kafka tail", Some(total.max(0) as u64));
    let patience = Duration::from_secs(60);
    let mut last_message = Instant::now();
    while next.iter().any(|(p, &n)| n < coverage[p]) {
        match consumer.poll(Duration::from_millis(200)) {
            None => {
                // Records the consumer passes over without handing them out (the markers that
                // end transactions, aborted records) hold no events: go on from its position.
                for (p, position) in kafka::positions(&consumer, &cfg.kafka.topic) {
                    if let (Some(n), Some(&cov)) = (next.get_mut(&p), coverage.get(&p)) {
                        if position > *n {
                            progress.inc((position.min(cov) - *n).max(0) as u64);
                            *n = position.min(cov);
                            last_message = Instant::now();
                        }
                    }
                }
                if last_message.elapsed() > patience {
                    bail!(
                        "no message from the topic for {} s while reading up to {coverage:?} (at {next:?})",
                        patience.as_secs()
                    );
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "consume error while reading the tail; retrying");
            }
            Some(Ok(msg)) => {
                last_message = Instant::now();
                let p = msg.partition();
                let offset = msg.offset();
                let (Some(n), Some(&cov)) = (next.get_mut(&p), coverage.get(&p)) else {
                    continue;
                };
                if offset < *n || offset >= cov {
                    continue;
                }
                *n = offset + 1;
                progress.inc(1);
                if let Some(to) = past_skipped(skipped, p, *n) {
                    *n = to;
                    kafka::seek(&consumer, &cfg.kafka.topic, p, to)?;
                }
                match decode(
                    msg.payload().unwrap_or(&[]),
                    msg.timestamp().to_millis(),
                    &rules,
                ) {
                    Ok(event) => {
                        report.from_kafka += 1;
                        streams.entry(p).or_default().push((offset, event));
                    }
                    Err(_) => report.rejected_in_tail += 1,
                }
            }
        }
    }
    progress.finish();
    Ok(())
}

/// Polls `/v1/status` until the merged answer covers the topic's high watermarks as they were
/// when verify started.
fn wait_for_coverage(cfg: &Config, base: &Url, wait: Duration) -> anyhow::Result<()> {
    let probe: BaseConsumer = kafka::client_config(&cfg.kafka)
        .create()
        .context("creating the Kafka client")?;
    let target = kafka::high_watermarks(&probe, &cfg.kafka.topic)?;
    let deadline = Instant::now() + wait;
    loop {
        let (status, body) = base.get("/v1/status")?;
        let covered: Offsets = if status == 200 {
            serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| serde_json::from_value(v["as_of"]["coverage"].clone()).ok())
                .unwrap_or_default()
        } else {
            Offsets::new()
        };
        let behind: Vec<(Partition, Offset)> = target
            .iter()
            .filter(|(p, &hw)| covered.get(p).copied().unwrap_or(0) < hw)
            .map(|(&p, &hw)| (p, hw - covered.get(&p).copied().unwrap_or(0)))
            .collect();
        if behind.is_empty() {
            eprintln!("verify: the serving layer covers the high watermarks {target:?}");
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the serving layer did not catch up within {} s; behind per partition: {behind:?}",
                wait.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Just enough of an HTTP/1.1 client (plain, or TLS with rustls) for the serving layer's own
/// answers. Every request carries the admin key, which the read routes accept too when the
/// server has a read key.
struct Url {
    host: String,
    port: u16,
    key: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// Where Debian and Ubuntu keep the system's trusted certificates.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl Url {
    fn parse(url: &str, key: &str, ca_cert: Option<&Path>) -> anyhow::Result<Url> {
        let (rest, https) = if let Some(rest) = url.strip_prefix("http://") {
            (rest, false)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (rest, true)
        } else {
            bail!("--url must start with http:// or https:// (got {url:?})");
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse()
                    .with_context(|| format!("bad port in --url {url:?}"))?,
            ),
            None => (authority.to_string(), if https { 443 } else { 80 }),
        };
        if host.is_empty() {
            bail!("no host in --url {url:?}");
        }
        let tls = if https {
            Some(Arc::new(tls_config(
                ca_cert.unwrap_or(Path::new(SYSTEM_CA_BUNDLE)),
            )?))
        } else if ca_cert.is_some() {
            bail!("--ca-cert is for an https:// --url (got {url:?})");
        } else {
            None
        };
        Ok(Url {
            host,
            port,
            key: key.to_string(),
            tls,
        })
    }

    fn get(&self, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        let addr = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", self.host))?
            .next()
            .ok_or_else(|| anyhow!("{} has no address", self.host))?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connecting to the serving layer at {addr}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(300)))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}:{}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            self.host, self.port, self.key
        );
        let raw = match &self.tls {
            None => exchange(tcp, &request),
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .with_context(|| format!("{:?} is not a TLS server name", self.host))?;
                let conn =
                    rustls::ClientConnection::new(config.clone(), name).context("starting TLS")?;
                exchange(rustls::StreamOwned::new(conn, tcp), &request)
            }
        }
        .with_context(|| format!("GET {path} from {}:{}", self.host, self.port))?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| anyhow!("malformed HTTP answer to GET {path}"))?;
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("malformed HTTP status line: {head:?}"))?;
        let body = raw[split + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            return Ok((status, dechunk(&body)?));
        }
        Ok((status, body))
    }
}

/// Sends `request` and reads the answer until the server closes the connection. A TLS peer
/// that closes without `close_notify` after a complete answer (`Connection: close`) is accepted.
fn exchange(mut s: impl Read + Write, request: &str) -> anyhow::Result<Vec<u8>> {
    s.write_all(request.as_bytes())?;
    s.flush()?;
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => Ok(raw),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => Ok(raw),
        Err(e) => Err(e).context("reading the answer"),
    }
}

/// Trusts the PEM certificates in `ca`.
fn tls_config(ca: &Path) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("reading trusted certificates from {}", ca.display()))?
    {
        let cert = cert.with_context(|| format!("a certificate in {}", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("a certificate in {}", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("no certificates in {}", ca.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("malformed chunked body"))?;
        let size_text = String::from_utf8_lossy(&b[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| anyhow!("malformed chunk size {size_text:?}"))?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = b
            .get(..size)
            .ok_or_else(|| anyhow!("truncated chunked body"))?;
        out.extend_from_slice(chunk);
        b = b.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_common::event::{ItemRef, Kind};

    fn purchase(id: &str, item: &str) -> Event {
        Event {
            id: id.into(),
            ts: 1_795_615_200_000,
            kind: Kind::Purchase {
                item: ItemRef {
                    user: "u1".into(),
                    item: item.into(),
                    category: None,
                },
                qty: 1,
                price_micros: 2_000_000,
            },
        }
    }

    fn set(events: &[Event]) -> ViewSet {
        let mut v = ViewSet::default();
        for e in events {
            v.fold(e);
        }
        v
    }

    #[test]
    fn equal_views_have_no_differences() {
        let events = [purchase("a", "i1"), purchase("b", "i2")];
        let served: Vec<_> = set(&events).entries.into_iter().collect();
        assert!(diff(set(&events), served).is_empty());
    }

    #[test]
    fn a_double_count_a_gap_and_an_extra_key_are_all_found() {
        let truth = set(&[purchase("a", "i1"), purchase("b", "i2")]);
        let served: Vec<_> = set(&[
            purchase("a", "i1"),
            purchase("a2", "i1"),
            purchase("c", "i3"),
        ])
        .entries
        .into_iter()
        .collect();
        let d = diff(truth, served);
        let item = |i: &str| ViewKey::Item(i.into());
        let has = |k: &ViewKey, exp: bool, srv: bool| {
            d.iter()
                .any(|x| &x.key == k && x.expected.is_some() == exp && x.served.is_some() == srv)
        };
        assert!(has(&item("i1"), true, true), "double count: {d:?}");
        assert!(has(&item("i2"), true, false), "gap: {d:?}");
        assert!(has(&item("i3"), false, true), "extra: {d:?}");
    }

    #[test]
    fn chunked_bodies_are_joined() {
        let body = b"4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\n\r\n";
        assert_eq!(dechunk(body).expect("chunked"), b"abcdefg");
        assert!(dechunk(b"zz\r\n").is_err());
    }

    #[test]
    fn urls_need_a_host() {
        let parse = |u: &str| Url::parse(u, "k", None);
        assert!(parse("http://127.0.0.1:8080").is_ok());
        assert!(parse("127.0.0.1:8080").is_err());
        assert!(parse("http://:80").is_err());
        assert!(parse("ftp://127.0.0.1:21").is_err());
        let e = Url::parse(
            "https://127.0.0.1:8443",
            "k",
            Some(Path::new("/nonexistent.pem")),
        );
        assert!(e.is_err_and(|e| format!("{e:#}").contains("/nonexistent.pem")));
        let e = Url::parse("http://127.0.0.1:8080", "k", Some(Path::new("/ca.pem")));
        assert!(e.is_err_and(|e| format!("{e:#}").contains("--ca-cert is for an https://")));
    }
}
