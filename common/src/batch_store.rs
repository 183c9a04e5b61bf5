//! Published batch versions: the layout both the batch layer (writer) and the serving layer
//! (reader) use.
//!
//! ```text
//! <data>/batch/versions/<version>/views.blocks every view's partials, in blocks with an index
//!                                             (crate::version_file); versions written before it
//!                                             hold views.bin (postcard), which only
//!                                             `load_views` reads
//! <data>/batch/CURRENT                        manifest of the served version (JSON)
//! <data>/batch/requests/<run id>              on-demand recompute requests
//! ```
//!
//! A version is written beside the old ones and fsynced, then published by renaming a new
//! `CURRENT` over the old one: one atomic step. A run that dies before the rename leaves the old
//! version served; its directory is removed by the next run.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::audience_file::{self, Audiences};
use crate::disk;
use crate::handoff::{Offsets, Partition};
use crate::retention::Marks;
use crate::version_file::{self, VersionFile};
use crate::views::{Basis, Partial, ViewKey, ViewSet};
use crate::{Error, Result};

/// What a published version holds and covers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u64,
    /// When the version was published (RFC 3339).
    pub published_at: String,
    /// The handoff block size the cutoffs are aligned to.
    pub block_size: u64,
    /// Per partition: every offset below the cutoff is in this version, none at or above it.
    pub cutoffs: Offsets,
    /// Events folded (after dedupe), duplicates skipped.
    pub events: u64,
    pub duplicates: u64,
    /// Number of view keys in the version.
    pub keys: u64,
    /// Wall time the recompute took.
    pub duration_ms: u64,
    /// Minute buckets retention left out of this version (`crate::retention`).
    #[serde(default, skip_serializing_if = "Marks::is_empty")]
    pub retention: Marks,
    /// The rollup generation of the master dataset this version was computed from (`None`:
    /// raw segments only). Raw files a generation replaced are deleted once a version of it is
    /// published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollup_generation: Option<u64>,
    /// What the master dataset held when this version was computed from it.
    #[serde(default)]
    pub dataset: DatasetStats,
}

/// Files, bytes and rows of the master dataset, by kind of file and by event type.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetStats {
    /// Per kind (`raw`: segments as archived; `kept`: events a rollup generation kept raw;
    /// `rollup`: rolled-up records) and event type (`mixed` for the files of every type).
    pub files: Vec<DatasetFiles>,
}

/// One row of [`DatasetStats`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetFiles {
    pub kind: String,
    pub event_type: String,
    pub files: u64,
    pub bytes: u64,
    /// Events (raw and kept files) or records (rollups) per event type read from these files.
    pub rows: BTreeMap<String, u64>,
}

pub fn root(data_dir: &Path) -> PathBuf {
    data_dir.join("batch")
}

fn versions_dir(data_dir: &Path) -> PathBuf {
    root(data_dir).join("versions")
}

/// The directory of version `version`.
pub fn version_dir(data_dir: &Path, version: u64) -> PathBuf {
    versions_dir(data_dir).join(format!("{version:010}"))
}

fn current_path(data_dir: &Path) -> PathBuf {
    root(data_dir).join("CURRENT")
}

fn requests_dir(data_dir: &Path) -> PathBuf {
    root(data_dir).join("requests")
}

fn runs_dir(data_dir: &Path) -> PathBuf {
    root(data_dir).join("runs")
}

/// Run records kept; older ones are removed as new runs start.
const KEEP_RUNS: usize = 200;

/// Where a batch run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Requested,
    Running,
    Published,
    Failed,
}

/// Progress of one batch run, as `GET /v1/admin/batch/{id}` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub state: RunState,
    /// `request` (POST /v1/admin/batch) or `schedule` (`--every`).
    pub trigger: String,
    pub requested_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Segments recomputed so far, of the total, while running.
    pub progress: Option<RunProgress>,
    pub version: Option<u64>,
    pub events: Option<u64>,
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunProgress {
    pub done: u64,
    pub total: u64,
}

impl RunRecord {
    pub fn new(id: String, state: RunState, trigger: &str) -> Self {
        RunRecord {
            id,
            state,
            trigger: trigger.into(),
            requested_at: None,
            started_at: None,
            finished_at: None,
            progress: None,
            version: None,
            events: None,
            error: None,
        }
    }
}

/// Whether `id` has the shape of a run id (so it can name a file safely).
pub fn valid_run_id(id: &str) -> bool {
    id.starts_with("run-")
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
}

/// Writes a run record atomically (temporary file, then rename).
pub fn write_run(data_dir: &Path, run: &RunRecord) -> Result<()> {
    let dir = runs_dir(data_dir);
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = dir.join(format!("{}.json", run.id));
    let tmp = dir.join(format!(".tmp-{}.json", run.id));
    let body = serde_json::to_vec_pretty(run).map_err(|e| Error::io(&tmp, e.into()))?;
    fs::write(&tmp, body).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
}

/// The record of run `id`, if there is one.
pub fn read_run(data_dir: &Path, id: &str) -> Result<Option<RunRecord>> {
    if !valid_run_id(id) {
        return Ok(None);
    }
    let path = runs_dir(data_dir).join(format!("{id}.json"));
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::corrupt(path.display().to_string(), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Removes all but the newest [`KEEP_RUNS`] run records (ids sort by time).
pub fn prune_runs(data_dir: &Path) -> Result<()> {
    let dir = runs_dir(data_dir);
    let mut names: Vec<String> = match fs::read_dir(&dir) {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| n.starts_with("run-"))
            .collect(),
        Err(_) => return Ok(()),
    };
    names.sort();
    let old = names.len().saturating_sub(KEEP_RUNS);
    for n in &names[..old] {
        let _ = fs::remove_file(dir.join(n));
    }
    Ok(())
}

/// A new run id: time first, so ids sort by when they were made.
pub fn new_run_id() -> String {
    format!(
        "run-{}-{:04x}",
        crate::time::now_millis(),
        rand::random::<u16>()
    )
}

/// The manifest of the served version, if one was ever published.
pub fn read_current(data_dir: &Path) -> Result<Option<Manifest>> {
    let path = current_path(data_dir);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::corrupt(path.display().to_string(), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// The file of a published version's views.
pub fn views_path(data_dir: &Path, version: u64) -> PathBuf {
    version_dir(data_dir, version).join("views.blocks")
}

/// Opens a published version's views for reading by key and range (see
/// [`crate::version_file`]).
pub fn open_views(data_dir: &Path, manifest: &Manifest) -> Result<VersionFile> {
    let path = views_path(data_dir, manifest.version);
    if !path.exists()
        && version_dir(data_dir, manifest.version)
            .join("views.bin")
            .exists()
    {
        return Err(Error::corrupt(
            path.display().to_string(),
            "version written in the older single-array format: run a batch recompute \
             (`strata batch --once` or POST /v1/admin/batch) to publish it anew",
        ));
    }
    VersionFile::open(&path)
}

/// A published version's item audiences of `basis` by number ([`crate::audience_file`]);
/// `None` for a version published before these files were written.
pub fn read_audiences(data_dir: &Path, version: u64, basis: Basis) -> Result<Option<Audiences>> {
    audience_file::read(&version_dir(data_dir, version).join(audience_file::file_name(basis)))
}

/// A published version's precounted rows of `basis` ([`crate::audience_file::RowFile`]).
pub fn open_rows(
    data_dir: &Path,
    version: u64,
    basis: Basis,
) -> Result<Option<audience_file::RowFile>> {
    audience_file::RowFile::open(
        &version_dir(data_dir, version).join(audience_file::rows_file_name(basis)),
    )
}

/// Loads every view of a published version into memory.
pub fn load_views(data_dir: &Path, manifest: &Manifest) -> Result<ViewSet> {
    let old = version_dir(data_dir, manifest.version).join("views.bin");
    let mut views = ViewSet::default();
    if !views_path(data_dir, manifest.version).exists() && old.exists() {
        let bytes = fs::read(&old).map_err(|e| Error::io(&old, e))?;
        let entries: Vec<(ViewKey, Partial)> = postcard::from_bytes(&bytes)
            .map_err(|e| Error::corrupt(old.display().to_string(), e))?;
        views.entries.extend(entries);
        return Ok(views);
    }
    let file = open_views(data_dir, manifest)?;
    views.entries.reserve(file.len() as usize);
    file.scan(&[], None, &mut |k, p| {
        views.entries.insert(k, p);
    })?;
    Ok(views)
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Writes `views` as the next version and publishes it atomically. `manifest.version` and
/// `manifest.keys` are filled in here.
pub fn publish(data_dir: &Path, views: &ViewSet, manifest: Manifest) -> Result<Manifest> {
    let mut entries: Vec<(&ViewKey, &Partial)> = views.entries.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    write_version(data_dir, &entries, manifest, &BTreeMap::new())
}

/// [`publish`] of entries already in key order: the concatenation of `chunks`, whose keys must
/// be strictly increasing (checked: anything else is an error and nothing is published).
///
/// `dedupe` holds, per partition, the dedupe rule's state at the version's cutoff
/// ([`crate::dedupe::PartitionDeduper::encode_handover`]), written beside the views: a speed layer
/// that takes a partition over without state of its own starts from there
/// ([`read_dedupe_state`]).
pub fn publish_sorted(
    data_dir: &Path,
    chunks: &[Vec<(ViewKey, Partial)>],
    manifest: Manifest,
    dedupe: &BTreeMap<Partition, Vec<u8>>,
) -> Result<Manifest> {
    let entries: Vec<(&ViewKey, &Partial)> = chunks.iter().flatten().map(|(k, p)| (k, p)).collect();
    if let Some(w) = entries.windows(2).find(|w| w[0].0 >= w[1].0) {
        return Err(Error::Other(format!(
            "batch entries out of key order: {:?} before {:?}",
            w[0].0, w[1].0
        )));
    }
    write_version(data_dir, &entries, manifest, dedupe)
}

/// The file of a version holding the dedupe rule's state of partition `p` at its cutoff.
pub fn dedupe_state_path(data_dir: &Path, version: u64, p: Partition) -> PathBuf {
    version_dir(data_dir, version).join(format!("dedupe.p{p}"))
}

/// The dedupe rule's state of partition `p` at the cutoff of `version` (`None`: the version has
/// none, e.g. one published before these files were written).
pub fn read_dedupe_state(data_dir: &Path, version: u64, p: Partition) -> Result<Option<Vec<u8>>> {
    let path = dedupe_state_path(data_dir, version, p);
    match fs::read(&path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Writes `entries` (in key order) as the next version and publishes it.
fn write_version(
    data_dir: &Path,
    entries: &[(&ViewKey, &Partial)],
    mut manifest: Manifest,
    dedupe: &BTreeMap<Partition, Vec<u8>>,
) -> Result<Manifest> {
    let previous = read_current(data_dir)?.map_or(0, |m| m.version);
    manifest.version = previous.max(highest_version_dir(data_dir)?) + 1;
    manifest.keys = entries.len() as u64;
    let dir = version_dir(data_dir, manifest.version);
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;

    // The file is in the order of the keys' encodings, which the order of `ViewKey` need not be.
    let mut encoded: Vec<(Vec<u8>, &Partial)> =
        entries.iter().map(|(k, p)| (k.encode(), *p)).collect();
    if encoded.windows(2).any(|w| w[0].0 >= w[1].0) {
        encoded.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    }
    version_file::write(&views_path(data_dir, manifest.version), &encoded)?;
    // The serving layer's co-occurrence index, numbered here once (crate::audience_file).
    // And every item's co-occurrence row, costliest first: read, not counted, when asked.
    for basis in Basis::ALL {
        let started = std::time::Instant::now();
        let audiences = Audiences::of(entries.iter().copied(), basis);
        audience_file::write(&dir.join(audience_file::file_name(basis)), &audiences)?;
        let histories = audiences.histories();
        let path = dir.join(audience_file::rows_file_name(basis));
        let rows = audience_file::write_rows(
            &path,
            &audiences,
            &histories,
            audience_file::ROWS_BYTES_MAX,
        )?;
        tracing::info!(
            ?basis,
            items = audiences.items.len(),
            users = audiences.users.len(),
            rows = rows.rows,
            row_entries = rows.entries,
            row_bytes = rows.bytes,
            ms = started.elapsed().as_millis() as u64,
            "numbered the audiences and counted the co-occurrence rows"
        );
    }
    for (&p, state) in dedupe {
        disk::write_synced(&dedupe_state_path(data_dir, manifest.version, p), state)?;
    }
    disk::write_synced(
        &dir.join("manifest.json"),
        &serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Other(e.to_string()))?,
    )?;
    sync_dir(&dir)?;
    sync_dir(&versions_dir(data_dir))?;

    let tmp = root(data_dir).join("CURRENT.tmp");
    disk::write_synced(
        &tmp,
        &serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Other(e.to_string()))?,
    )?;
    let current = current_path(data_dir);
    crate::fault::point("batch.publish.before_current");
    fs::rename(&tmp, &current).map_err(|e| Error::io(&current, e))?;
    crate::fault::point("batch.publish.after_current");
    sync_dir(&root(data_dir))?;
    Ok(manifest)
}

fn version_dirs(data_dir: &Path) -> Result<Vec<u64>> {
    let dir = versions_dir(data_dir);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        if let Some(v) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(v);
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn highest_version_dir(data_dir: &Path) -> Result<u64> {
    Ok(version_dirs(data_dir)?.last().copied().unwrap_or(0))
}

/// Removes what dead runs left (unpublished versions, temporary files) and old versions beyond
/// the newest `keep` published ones. Returns the versions removed.
pub fn clean(data_dir: &Path, keep: usize) -> Result<Vec<u64>> {
    let current = read_current(data_dir)?.map_or(0, |m| m.version);
    let _ = fs::remove_file(root(data_dir).join("CURRENT.tmp"));
    let mut removed = Vec::new();
    let published: Vec<u64> = version_dirs(data_dir)?
        .into_iter()
        .filter(|&v| v <= current)
        .collect();
    let old = published.len().saturating_sub(keep.max(1));
    for v in version_dirs(data_dir)? {
        let dead = v > current;
        let expired = published[..old].contains(&v);
        if dead || expired {
            let dir = version_dir(data_dir, v);
            fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            removed.push(v);
        }
    }
    Ok(removed)
}

/// Asks the batch layer for a recompute; returns the run id.
pub fn request_run(data_dir: &Path) -> Result<String> {
    let dir = requests_dir(data_dir);
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let id = new_run_id();
    let mut run = RunRecord::new(id.clone(), RunState::Requested, "request");
    run.requested_at = Some(crate::time::format_rfc3339(crate::time::now_millis()));
    write_run(data_dir, &run)?;
    let path = dir.join(&id);
    File::create(&path).map_err(|e| Error::io(&path, e))?;
    Ok(id)
}

/// Takes (removes and returns) the pending recompute requests.
pub fn take_requests(data_dir: &Path) -> Result<Vec<String>> {
    let dir = requests_dir(data_dir);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        let path = entry.path();
        if let Some(name) = entry.file_name().to_str() {
            out.push(name.to_string());
        }
        fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::ItemStats;

    fn manifest() -> Manifest {
        Manifest {
            version: 0,
            published_at: "2026-11-25T00:00:00.000Z".into(),
            block_size: 100,
            cutoffs: Offsets::from([(0, 300)]),
            events: 3,
            duplicates: 0,
            keys: 0,
            duration_ms: 1,
            ..Default::default()
        }
    }

    #[test]
    fn publish_then_read_then_clean() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_current(dir.path()).expect("read"), None);
        let mut views = ViewSet::default();
        views.add(
            ViewKey::Item("i".into()),
            &Partial::Item(ItemStats {
                views: 3,
                ..Default::default()
            }),
        );
        let m1 = publish(dir.path(), &views, manifest()).expect("publish");
        assert_eq!((m1.version, m1.keys), (1, 1));
        let m2 = publish(dir.path(), &views, manifest()).expect("publish");
        assert_eq!(m2.version, 2);
        assert_eq!(read_current(dir.path()).expect("read"), Some(m2.clone()));
        assert_eq!(load_views(dir.path(), &m2).expect("load"), views);
        // A dead run's directory, above the published version.
        fs::create_dir_all(version_dir(dir.path(), 3)).expect("mkdir");
        let removed = clean(dir.path(), 1).expect("clean");
        assert_eq!(removed, vec![1, 3]);
        assert_eq!(load_views(dir.path(), &m2).expect("load"), views);
    }

    #[test]
    fn sorted_chunks_publish_as_their_union_and_out_of_order_ones_not_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = |views| {
            Partial::Item(ItemStats {
                views,
                ..Default::default()
            })
        };
        let mut whole = ViewSet::default();
        let mut sorted: Vec<(ViewKey, Partial)> = Vec::new();
        for i in 0..10u64 {
            let key = ViewKey::Item(format!("i{i}").into());
            whole.add(key.clone(), &stats(i));
            sorted.push((key, stats(i)));
        }
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let chunks = vec![sorted[..4].to_vec(), sorted[4..].to_vec()];
        let m1 = publish(dir.path(), &whole, manifest()).expect("publish");
        let m2 =
            publish_sorted(dir.path(), &chunks, manifest(), &BTreeMap::new()).expect("publish");
        assert_eq!((m1.keys, m2.keys), (10, 10));
        let bytes =
            |m: &Manifest| fs::read(version_dir(dir.path(), m.version).join("views.blocks"));
        assert_eq!(bytes(&m1).expect("read"), bytes(&m2).expect("read"));
        let swapped = vec![sorted[4..].to_vec(), sorted[..4].to_vec()];
        assert!(publish_sorted(dir.path(), &swapped, manifest(), &BTreeMap::new()).is_err());
        assert_eq!(read_current(dir.path()).expect("read"), Some(m2));
    }

    #[test]
    fn requests_are_taken_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = request_run(dir.path()).expect("request");
        assert_eq!(take_requests(dir.path()).expect("take"), vec![id]);
        assert!(take_requests(dir.path()).expect("take").is_empty());
    }
}
