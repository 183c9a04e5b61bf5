//! Recommendations from co-occurrence in users' histories.
//!
//! Two items co-occur once for every user whose history (views, or purchases) holds both. Rows
//! are ranked by cosine similarity, `co / sqrt(users(a) * users(b))`, which does not favour items
//! only for being popular. Everything is computed from the merged item audiences and user
//! histories, so the counts are exact for all accepted events. The rows of one item cost a walk
//! over the histories of its audience, by number ([`crate::cooccur`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use strata_common::views::{Basis, FastMap, Name, Partial, ViewKey};

use crate::cooccur::{CoIndex, CoRows, Merged, Overlay};
use crate::error::ApiError;
use crate::insights::{item_totals, top_n, Window};
use crate::state::{blocks_since, Merge, PerState, ServingState};
use strata_common::handoff::BlockRange;

fn history(m: &Merge<'_>, basis: Basis, user: &str) -> Result<BTreeMap<Name, i64>, ApiError> {
    Ok(
        match m.get(&ViewKey::UserItems {
            basis,
            user: user.into(),
        })? {
            Some(Partial::Recent(r)) => r.0,
            _ => BTreeMap::new(),
        },
    )
}

/// Co-occurrence rows kept at most (about 48 bytes each), across items.
pub const CO_MEMO_ROWS: usize = 1_000_000;

/// Co-occurrence rows of the items asked about, for one state: a user's recommendations read
/// the rows of their recent items, and popular items are among many users' recent ones. Rows
/// are kept for the state they were computed from (the merge's
/// [`crate::state::StateId`]) and dropped as soon as a merge of a later state keeps its own, so
/// they are exactly what computing them again would give. What the speed layer adds to the
/// batch version's audiences and histories is read in [`Overlay`] layers: those of the blocks
/// every partition has consumed past, kept for as long as the batch version stands (a block
/// finished since adds a layer over them, up to [`FINISHED_LAYERS`]; then they are read again as
/// one), and over them that of each partition's last block, kept for the state like the rows.
pub struct CoMemo {
    max_rows: usize,
    kept: Mutex<PerState<CoKept>>,
    /// Per basis: the finished blocks' layers, with the batch version and blocks they were read
    /// from.
    finished: Mutex<[Option<FinishedLayers>; 2]>,
}

/// Layers over a batch version's index, lowest first.
type Layers = Vec<Arc<Overlay>>;

/// Which finished blocks layers were read from, over which batch version, and the layers.
type FinishedLayers = ((Option<u64>, Vec<BlockRange>), Arc<Layers>);

/// How many layers the finished blocks may be read in before they are read again as one.
pub const FINISHED_LAYERS: usize = 8;

#[derive(Default)]
struct CoKept {
    rows: usize,
    by_item: FastMap<(Basis, Name), Option<Arc<CoRows>>>,
    /// Per basis: the finished blocks' layers and the last blocks' layer over them.
    layers: [Option<Arc<Layers>>; 2],
}

impl CoMemo {
    pub fn new(max_rows: usize) -> Self {
        CoMemo {
            max_rows,
            kept: Mutex::new(PerState::default()),
            finished: Mutex::new(Default::default()),
        }
    }

    /// The rows of `item` in the state of `m`: kept ones, or computed (and kept); `None` if the
    /// item has no audience.
    pub fn rows(
        &self,
        m: &Merge<'_>,
        basis: Basis,
        item: &str,
    ) -> Result<Option<Arc<CoRows>>, ApiError> {
        let slot = basis.index();
        let index = m.co_index(basis)?;
        let Some(at) = m.state_id else {
            let layers = self.layers(m, &index, basis)?;
            return Ok(rows_of(&index, &layers, item));
        };
        let key = (basis, Name::from(item));
        let kept_layers = {
            let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            let kept = kept.at(at);
            if let Some(rows) = kept.and_then(|k| k.by_item.get(&key)) {
                return Ok(rows.clone());
            }
            kept.and_then(|k| k.layers[slot].clone())
        };
        let layers = match kept_layers {
            Some(layers) => layers,
            None => self.layers(m, &index, basis)?,
        };
        let rows = rows_of(&index, &layers, item);
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let Some(kept) = kept.for_state(at) else {
            return Ok(rows);
        };
        kept.layers[slot].get_or_insert(layers);
        let n = rows.as_ref().map_or(0, |r| r.rows.len());
        if kept.rows + n <= self.max_rows && !kept.by_item.contains_key(&key) {
            kept.rows += n;
            kept.by_item.insert(key, rows.clone());
        }
        Ok(rows)
    }

    /// The layers of the speed layer's additions in the state of `m`: the finished blocks' (the
    /// kept ones, with a layer over them for blocks finished since), then the last blocks'.
    fn layers(
        &self,
        m: &Merge<'_>,
        index: &CoIndex,
        basis: Basis,
    ) -> Result<Arc<Layers>, ApiError> {
        let slot = basis.index();
        let (done, open) = m.speed_blocks();
        let version = m.batch().map(|b| b.manifest.version);
        let kept = {
            let finished = self.finished.lock().unwrap_or_else(|e| e.into_inner());
            finished[slot].clone()
        };
        let (chain, read) = match kept {
            Some(((v, read), chain)) if v == version => (chain, read),
            _ => (Arc::default(), Vec::new()),
        };
        let build = |under: &[Arc<Overlay>], blocks: &[BlockRange]| {
            let layers = under.iter().map(|l| &**l).collect();
            let under = Merged { index, layers };
            Overlay::build(&under, basis, |prefix, f| {
                m.scan_speed_in(blocks, prefix, None, f)
            })
            .map(Arc::new)
        };
        let chain = if read == done {
            chain
        } else {
            let since = blocks_since(&read, &done).filter(|_| chain.len() < FINISHED_LAYERS);
            let chain = Arc::new(match since {
                Some(since) => {
                    let mut layers = (*chain).clone();
                    layers.push(build(&chain, &since)?);
                    layers
                }
                None => vec![build(&[], &done)?],
            });
            let mut kept = self.finished.lock().unwrap_or_else(|e| e.into_inner());
            kept[slot] = Some(((version, done), chain.clone()));
            chain
        };
        let mut layers = (*chain).clone();
        layers.push(build(&chain, &open)?);
        Ok(Arc::new(layers))
    }
}

fn rows_of(index: &CoIndex, layers: &Layers, item: &str) -> Option<Arc<CoRows>> {
    let layers = layers.iter().map(|l| &**l).collect();
    Merged { index, layers }.rows(item).map(Arc::new)
}

/// Items that co-occur with `item`.
pub fn for_item(
    state: &ServingState,
    item: &str,
    basis: Basis,
    limit: usize,
) -> Result<Value, ApiError> {
    state.with_merge(|m| {
        let Some(rows) = state.co_rows.rows(m, basis, item)? else {
            return Err(ApiError::not_found(format!(
                "no {} history for item {item:?}",
                basis_name(basis)
            )));
        };
        let items: Vec<Value> = (rows.rows.iter())
            .take(limit)
            .map(|r| json!({"item": r.item, "score": r.score, "co_occurrences": r.co, "users": r.users}))
            .collect();
        Ok(json!({
            "item": item,
            "basis": basis_name(basis),
            "users": rows.users,
            "items": items,
            "as_of": m.as_of,
        }))
    })
}

fn basis_name(b: Basis) -> &'static str {
    match b {
        Basis::View => "view",
        Basis::Purchase => "purchase",
    }
}

/// How many of the user's most recent items seed personal recommendations.
pub const RECENT_ITEMS: usize = 10;

/// Items that co-occur (by views) with the user's most recent items, without what the user
/// already bought. A user with no history gets the all-time top purchased items, marked as such.
pub fn for_user(state: &ServingState, user: &str, limit: usize) -> Result<Value, ApiError> {
    state.with_merge(|m| {
        let viewed = history(m, Basis::View, user)?;
        let bought = history(m, Basis::Purchase, user)?;
        if viewed.is_empty() && bought.is_empty() {
            let totals = item_totals(state, m, Window::All, 0)?;
            let top = totals.top("purchase", None, limit);
            let items: Vec<Value> = top
                .iter()
                .map(|(i, c)| json!({"item": i, "purchases": c}))
                .collect();
            return Ok(
                json!({"user": user, "source": "top_items", "items": items, "as_of": m.as_of}),
            );
        }
        let mut latest: BTreeMap<&Name, i64> = BTreeMap::new();
        for (i, &t) in viewed.iter().chain(bought.iter()) {
            let e = latest.entry(i).or_insert(t);
            *e = (*e).max(t);
        }
        let mut recent: Vec<(&Name, i64)> = latest.into_iter().collect();
        recent.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        recent.truncate(RECENT_ITEMS);
        let mut scores: BTreeMap<Name, (f64, Vec<Name>)> = BTreeMap::new();
        for (seed, _) in &recent {
            if let Some(rows) = state.co_rows.rows(m, Basis::View, seed)? {
                for r in &rows.rows {
                    if bought.contains_key(&r.item) {
                        continue;
                    }
                    let e = scores.entry(r.item.clone()).or_default();
                    e.0 += r.score;
                    e.1.push((*seed).clone());
                }
            }
        }
        let mut rows: Vec<(Name, f64, Vec<Name>)> =
            scores.into_iter().map(|(i, (s, b))| (i, s, b)).collect();
        top_n(&mut rows, limit, |a, b| {
            b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0))
        });
        let items: Vec<Value> = rows
            .iter()
            .map(|(i, s, because)| json!({"item": i, "score": s, "because": because}))
            .collect();
        Ok(json!({
            "user": user,
            "source": "co_occurrence",
            "recent_items": recent.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
            "items": items,
            "as_of": m.as_of,
        }))
    })
}
