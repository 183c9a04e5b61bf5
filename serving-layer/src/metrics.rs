//! Prometheus metrics (`GET /metrics`, text exposition format 0.0.4).
//!
//! Request counts and latency histograms per route are kept here as the requests go by;
//! everything else is read at scrape time from the state every layer shares: the speed layer's
//! counters and offsets (its RocksDB meta), the newest batch version's manifest, the topic's high
//! watermarks, and the size on disk of the speed state and the master dataset. So one scrape of
//! the serving layer describes all three layers, whichever processes they run in.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use strata_common::batch_store::DatasetFiles;
use strata_common::time::{now_millis, parse_rfc3339};

use crate::answers::Answers;
use crate::state::ServingState;

/// Every route: method and path template. Metrics label requests with the template; the OpenAPI
/// document must list exactly these (a test checks it).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/v1/items/{item}"),
    ("GET", "/v1/insights/top-items"),
    ("GET", "/v1/insights/trending"),
    ("GET", "/v1/insights/timeseries"),
    ("GET", "/v1/recommendations/items/{item}"),
    ("GET", "/v1/recommendations/users/{user}"),
    ("GET", "/v1/devices/health"),
    ("GET", "/v1/devices/{device}/health"),
    ("GET", "/v1/status"),
    ("POST", "/v1/admin/batch"),
    ("GET", "/v1/admin/batch/{id}"),
    ("GET", "/v1/admin/views"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
];

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Default)]
struct RouteStats {
    /// Requests per status class (1xx..5xx).
    by_class: [AtomicU64; 5],
    /// Cumulative counts are computed at render time; these are per bucket (+Inf last).
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

/// Request metrics, one slot per route template plus one for requests matching none.
pub struct HttpMetrics {
    routes: Vec<RouteStats>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            routes: (0..=ROUTES.len()).map(|_| RouteStats::default()).collect(),
        }
    }
}

/// The template a request path belongs to (`None`: no route).
pub fn route_of(path: &str) -> Option<&'static str> {
    route_index(path).map(|i| ROUTES[i].1)
}

/// The position in [`ROUTES`] of the template a request path belongs to. Runs for every
/// request, so it compares segment by segment without collecting them.
fn route_index(path: &str) -> Option<usize> {
    ROUTES.iter().position(|(_, t)| matches(t, path))
}

/// The methods some route answers on `path`, for the `Allow` header of a 405 (RFC 9110 15.5.6).
pub fn allowed_methods(path: &str) -> Vec<&'static str> {
    let mut methods: Vec<&'static str> = ROUTES
        .iter()
        .filter(|(_, t)| matches(t, path))
        .map(|(m, _)| *m)
        .collect();
    methods.sort_unstable();
    methods.dedup();
    methods
}

fn matches(template: &str, path: &str) -> bool {
    let mut want = template.trim_start_matches('/').split('/');
    let mut got = path.trim_start_matches('/').split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return true,
            (Some(w), Some(g)) if w == g || (w.starts_with('{') && !g.is_empty()) => {}
            _ => return false,
        }
    }
}

impl HttpMetrics {
    pub fn observe(&self, path: &str, status: u16, secs: f64) {
        let idx = route_index(path).unwrap_or(ROUTES.len());
        let Some(r) = self.routes.get(idx) else {
            return;
        };
        let class = usize::from((status / 100).clamp(1, 5) - 1);
        r.by_class[class].fetch_add(1, Ordering::Relaxed);
        let b = BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(BUCKETS.len());
        r.buckets[b].fetch_add(1, Ordering::Relaxed);
        r.sum_micros
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        header(
            out,
            "strata_http_requests_total",
            "counter",
            "HTTP requests by route template and status class.",
        );
        for (i, r) in self.routes.iter().enumerate() {
            let route = ROUTES.get(i).map_or("other", |(_, t)| t);
            for (c, n) in r.by_class.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "strata_http_requests_total{{route=\"{route}\",code=\"{}xx\"}} {n}",
                        c + 1
                    );
                }
            }
        }
        header(
            out,
            "strata_http_request_duration_seconds",
            "histogram",
            "Time to answer, by route template.",
        );
        for (i, r) in self.routes.iter().enumerate() {
            let route = ROUTES.get(i).map_or("other", |(_, t)| t);
            let counts: Vec<u64> = r
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
            let total: u64 = counts.iter().sum();
            if total == 0 {
                continue;
            }
            let mut cumulative = 0;
            for (le, n) in BUCKETS.iter().zip(&counts) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "strata_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "strata_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {total}"
            );
            let _ = writeln!(
                out,
                "strata_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                r.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "strata_http_request_duration_seconds_count{{route=\"{route}\"}} {total}"
            );
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

/// Bytes of all files under `dir` (0 if it does not exist).
/// A gauge per master-dataset row of [`DatasetFiles`]: name, help, the value of one row.
type Sized = (&'static str, &'static str, fn(&DatasetFiles) -> u64);

/// The whole exposition.
pub fn render(state: &ServingState, answers: &Answers, http_metrics: &HttpMetrics) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let now = now_millis();

    let broker = state.broker();
    gauge(
        &mut out,
        "strata_broker_up",
        "1 when the broker answered the serving layer's last probe.",
        u8::from(broker.reachable),
    );

    let (kept, computed) = answers.counts();
    header(
        &mut out,
        "strata_answers_total",
        "counter",
        "Query answers by source: kept (the state had not moved since it was computed) or computed.",
    );
    let _ = writeln!(out, "strata_answers_total{{source=\"kept\"}} {kept}");
    let _ = writeln!(
        out,
        "strata_answers_total{{source=\"computed\"}} {computed}"
    );

    let merged = state
        .with_merge(|m| Ok((m.speed_meta.clone(), m.tail_runs())))
        .ok();
    let meta = merged.as_ref().map(|(meta, _)| meta.clone());
    if let Some((_, (runs, blocks))) = &merged {
        gauge(
            &mut out,
            "strata_tail_runs",
            "Runs of finished speed blocks a point read looks in now (serve.run-blocks).",
            runs,
        );
        gauge(
            &mut out,
            "strata_tail_run_blocks",
            "Finished speed blocks past the batch cutoffs that those runs hold.",
            blocks,
        );
    }
    header(
        &mut out,
        "strata_tail_run_files_total",
        "counter",
        "Run files of finished speed blocks started since start (written or given up).",
    );
    let _ = writeln!(
        out,
        "strata_tail_run_files_total {}",
        state.tail_run_files()
    );
    if let Some(meta) = &meta {
        header(
            &mut out,
            "strata_speed_events_total",
            "counter",
            "Messages the speed layer consumed, by partition and outcome (accepted includes duplicates).",
        );
        for (p, m) in &meta.partitions {
            for (outcome, n) in [
                ("accepted", m.accepted),
                ("rejected", m.rejected),
                ("duplicate", m.duplicates),
            ] {
                let _ = writeln!(
                    out,
                    "strata_speed_events_total{{partition=\"{p}\",outcome=\"{outcome}\"}} {n}"
                );
            }
        }
        header(
            &mut out,
            "strata_speed_next_offset",
            "gauge",
            "Next offset the speed layer will consume, by partition.",
        );
        for (p, m) in &meta.partitions {
            let _ = writeln!(
                out,
                "strata_speed_next_offset{{partition=\"{p}\"}} {}",
                m.next_offset
            );
        }
        header(
            &mut out,
            "strata_speed_partition_stalled",
            "gauge",
            "1 while the speed layer waits in front of records it cannot decode (kafka.undecodable = \"stall\"), by partition.",
        );
        for (p, m) in &meta.partitions {
            let _ = writeln!(
                out,
                "strata_speed_partition_stalled{{partition=\"{p}\"}} {}",
                u8::from(m.stall.is_some())
            );
        }
        header(
            &mut out,
            "strata_speed_skipped_records_total",
            "counter",
            "Offsets the speed layer passed over as undecodable (kafka.undecodable = \"skip\"), by partition.",
        );
        for (p, m) in &meta.partitions {
            let _ = writeln!(
                out,
                "strata_speed_skipped_records_total{{partition=\"{p}\"}} {}",
                m.skipped_records()
            );
        }
        let archive_stalls = strata_common::undecodable::read_stalls(&state.cfg.master_dir());
        header(
            &mut out,
            "strata_archive_partition_stalled",
            "gauge",
            "1 while the archiver waits in front of records it cannot decode, by partition.",
        );
        for p in meta.partitions.keys() {
            let _ = writeln!(
                out,
                "strata_archive_partition_stalled{{partition=\"{p}\"}} {}",
                u8::from(archive_stalls.contains_key(p))
            );
        }
        if let Some(hw) = state.high_watermarks() {
            header(
                &mut out,
                "strata_consumer_lag",
                "gauge",
                "Topic high watermark minus the speed layer's next offset, by partition.",
            );
            for (p, high) in &hw {
                let next = meta.partitions.get(p).map_or(0, |m| m.next_offset);
                let _ = writeln!(
                    out,
                    "strata_consumer_lag{{layer=\"speed\",partition=\"{p}\"}} {}",
                    (high - next).max(0)
                );
            }
        }
        if let Some(t) = meta.flushed_at {
            gauge(
                &mut out,
                "strata_speed_state_age_seconds",
                "Seconds since the speed layer last wrote its state.",
                (now - t).max(0) as f64 / 1e3,
            );
        }
    }

    if let Some(b) = state.batch() {
        let m = &b.manifest;
        gauge(
            &mut out,
            "strata_batch_version",
            "The batch version being served.",
            m.version,
        );
        if let Some(t) = parse_rfc3339(&m.published_at) {
            gauge(
                &mut out,
                "strata_batch_version_age_seconds",
                "Seconds since the served batch version was published.",
                (now - t).max(0) as f64 / 1e3,
            );
        }
        gauge(
            &mut out,
            "strata_batch_duration_seconds",
            "How long the recompute of the served version took.",
            m.duration_ms as f64 / 1e3,
        );
        gauge(
            &mut out,
            "strata_batch_events",
            "Events counted in the served batch version (after dedupe).",
            m.events,
        );
        gauge(
            &mut out,
            "strata_batch_duplicates",
            "Copies skipped by the served batch version.",
            m.duplicates,
        );
        gauge(
            &mut out,
            "strata_batch_keys",
            "View keys in the served batch version.",
            m.keys,
        );
        if !m.dataset.files.is_empty() {
            let sizes: [Sized; 2] = [
                (
                    "strata_master_dataset_files",
                    "Master-dataset files as the served version's recompute found them, by kind (raw segments, replaced segments awaiting deletion, events a rollup kept raw, rollup records) and event type (mixed: files of every type).",
                    |f| f.files,
                ),
                (
                    "strata_master_dataset_kind_bytes",
                    "Bytes of the files of strata_master_dataset_files, by the same labels.",
                    |f| f.bytes,
                ),
            ];
            for (name, help, value) in sizes {
                header(&mut out, name, "gauge", help);
                for f in &m.dataset.files {
                    let _ = writeln!(
                        out,
                        "{name}{{kind=\"{}\",type=\"{}\"}} {}",
                        f.kind,
                        f.event_type,
                        value(f)
                    );
                }
            }
            header(
                &mut out,
                "strata_master_dataset_rows",
                "gauge",
                "Rows of those files: events per event type in raw files; in rollup files, the records and the events they stand for.",
            );
            for f in &m.dataset.files {
                for (row, n) in &f.rows {
                    let _ = writeln!(
                        out,
                        "strata_master_dataset_rows{{kind=\"{}\",type=\"{}\",rows=\"{row}\"}} {n}",
                        f.kind, f.event_type
                    );
                }
            }
        }
    }

    gauge(
        &mut out,
        "strata_speed_state_bytes",
        "Size on disk of the speed layer's RocksDB state.",
        strata_common::disk::dir_bytes(&state.cfg.speed_dir()),
    );
    gauge(
        &mut out,
        "strata_master_dataset_bytes",
        "Size on disk of the master dataset.",
        strata_common::disk::dir_bytes(&state.cfg.master_dir()),
    );
    gauge(
        &mut out,
        "strata_batch_versions_bytes",
        "Size on disk of the kept batch versions.",
        strata_common::disk::dir_bytes(&strata_common::batch_store::root(&state.cfg.data_dir)),
    );
    http_metrics.render(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_their_templates() {
        assert_eq!(route_of("/v1/items/abc"), Some("/v1/items/{item}"));
        assert_eq!(
            route_of("/v1/devices/d1/health"),
            Some("/v1/devices/{device}/health")
        );
        assert_eq!(route_of("/v1/devices/health"), Some("/v1/devices/health"));
        assert_eq!(route_of("/"), Some("/"));
        assert_eq!(route_of("/v1/items/"), None);
        assert_eq!(route_of("/nope"), None);
    }

    #[test]
    fn allowed_methods_list_every_route_on_a_path() {
        assert_eq!(allowed_methods("/v1/admin/batch"), ["POST"]);
        assert_eq!(allowed_methods("/v1/admin/batch/r1"), ["GET"]);
        assert_eq!(allowed_methods("/v1/items/i1"), ["GET"]);
        assert!(allowed_methods("/v1/nope").is_empty());
    }

    #[test]
    fn histograms_are_cumulative() {
        let m = HttpMetrics::default();
        m.observe("/v1/items/a", 200, 0.0004);
        m.observe("/v1/items/b", 404, 0.02);
        m.observe("/nope", 404, 0.001);
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("strata_http_requests_total{route=\"/v1/items/{item}\",code=\"2xx\"} 1")
        );
        assert!(
            out.contains("strata_http_requests_total{route=\"/v1/items/{item}\",code=\"4xx\"} 1")
        );
        assert!(out.contains("strata_http_requests_total{route=\"other\",code=\"4xx\"} 1"));
        assert!(out.contains(
            "strata_http_request_duration_seconds_bucket{route=\"/v1/items/{item}\",le=\"0.0005\"} 1"
        ));
        assert!(out.contains(
            "strata_http_request_duration_seconds_bucket{route=\"/v1/items/{item}\",le=\"0.025\"} 2"
        ));
        assert!(out
            .contains("strata_http_request_duration_seconds_count{route=\"/v1/items/{item}\"} 2"));
    }
}
