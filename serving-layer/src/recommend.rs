//! Recommendations from co-occurrence in users' histories.
//!
//! Two items co-occur once for every user whose history (views, or purchases) holds both. Rows
//! are ranked by cosine similarity, `co / sqrt(users(a) * users(b))`, which does not favour items
//! only for being popular. Everything is computed from the merged item audiences and user
//! histories, so the counts are exact for all accepted events. The rows of one item cost a walk
//! over the histories of its audience, by number ([`crate::cooccur`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use strata_common::views::{Basis, FastMap, Name, Partial, ViewKey};

use crate::cooccur::{CoIndex, CoRow, CoRows, Counter, Merged, Overlay};
use crate::error::ApiError;
use crate::insights::{item_totals, Window};
use crate::rankings::{top_n, TotalsMemo};
use crate::state::{blocks_since, Merge, PerState, ServingState};
use strata_common::handoff::{BlockRange, Partition};
use strata_common::speed_store;

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

/// How many ranked rows fit in `mb` MiB (each row's item name and figures).
pub fn memo_rows(mb: usize) -> usize {
    (mb << 20) / std::mem::size_of::<CoRow>()
}

/// Co-occurrence rows of the items asked about, for one state: a user's recommendations read
/// the rows of their recent items, and popular items are among many users' recent ones. Rows
/// are kept for the state they were computed from (the merge's
/// [`crate::state::StateId`]) and dropped as soon as a merge of a later state keeps its own, so
/// they are exactly what computing them again would give. What the speed layer adds to the
/// batch version's audiences and histories is read in [`Overlay`] layers: those of the blocks
/// every partition has consumed past, one layer kept for as long as the batch version stands (a
/// block finished since is read over it and taken into it), and over it the partitions' last
/// blocks ([`OpenLayers`]: read whole once, then brought forward from the speed journal).
pub struct CoMemo {
    max_rows: usize,
    kept: Mutex<PerState<CoKept>>,
    /// Per basis: the finished blocks' layers, with the batch version and blocks they were read
    /// from.
    finished: Mutex<[Option<FinishedLayers>; 2]>,
    /// Per basis: the last blocks' layers over the finished ones. Held while they are brought
    /// up to a newer state, so that requests arriving together read them once.
    open: Mutex<[Option<OpenLayers>; 2]>,
    /// How many times the last blocks' layers were brought forward from the journal.
    journal_steps: AtomicU64,
}

/// The last blocks read as layers over the finished blocks' ones: the blocks themselves read
/// once, then one layer per newer state from the journal's deltas since (what the flushes in
/// between folded), the deltas' layers taken into one every [`OPEN_INCREMENTS`].
struct OpenLayers {
    /// The finished blocks' layers these are over.
    finished: Arc<Layers>,
    open: Vec<BlockRange>,
    /// Per partition, the next offset the layers cover.
    covered: BTreeMap<Partition, i64>,
    /// The finished blocks' layers, then the last blocks', then the deltas' since.
    layers: Arc<Layers>,
    increments: usize,
}

/// How many layers of journal deltas are read over the last blocks before they are taken
/// into one.
pub const OPEN_INCREMENTS: usize = 4;

/// How many states the last blocks are brought forward by journal deltas before they are read
/// again whole (the deltas' layer grows with the block).
pub const OPEN_REFRESH: usize = 256;

/// Layers over a batch version's index, lowest first.
pub type Layers = Vec<Arc<Overlay>>;

/// Which finished blocks layers were read from, over which batch version, and the layers.
type FinishedLayers = ((Option<u64>, Vec<BlockRange>), Arc<Layers>);

#[derive(Default)]
struct CoKept {
    rows: usize,
    by_item: FastMap<(Basis, Name), Option<Arc<CoRows>>>,
    /// Per basis: the finished blocks' layers and the last blocks' layer over them.
    layers: [Option<Arc<Layers>>; 2],
    /// Per basis: every item's merged audience size.
    audiences: [Option<Arc<Vec<u32>>>; 2],
}

/// A basis's merged audiences and histories in one state: the index, the layers over it, and
/// every item's audience size by number.
pub struct Stack {
    pub index: Arc<CoIndex>,
    pub layers: Arc<Layers>,
    pub audiences: Arc<Vec<u32>>,
}

impl CoMemo {
    pub fn new(max_rows: usize) -> Self {
        CoMemo {
            max_rows,
            kept: Mutex::new(PerState::default()),
            finished: Mutex::new(Default::default()),
            open: Mutex::new(Default::default()),
            journal_steps: AtomicU64::new(0),
        }
    }

    /// How many times the last blocks' layers were brought forward from the journal's deltas
    /// (rather than read again whole).
    pub fn journal_steps(&self) -> u64 {
        self.journal_steps.load(Ordering::Relaxed)
    }

    /// The index of `basis` and the layers over it in the state of `m` (its merged item
    /// audiences and user histories), and every item's merged audience size by number.
    pub fn stack(&self, m: &Merge<'_>, basis: Basis) -> Result<Stack, ApiError> {
        let slot = basis.index();
        let index = m.co_index(basis)?;
        let audiences = |layers: &Layers| {
            let layers = layers.iter().map(|l| &**l).collect();
            Arc::new(
                Merged {
                    index: &index,
                    layers,
                }
                .audiences(),
            )
        };
        let Some(at) = m.state_id else {
            let layers = self.layers(m, &index, basis)?;
            let audiences = audiences(&layers);
            return Ok(Stack {
                index,
                layers,
                audiences,
            });
        };
        let kept = {
            let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            kept.at(at)
                .and_then(|k| Some((k.layers[slot].clone()?, k.audiences[slot].clone())))
        };
        let (layers, audiences) = match kept {
            Some((layers, Some(audiences))) => (layers, audiences),
            kept => {
                let layers = match kept {
                    Some((layers, _)) => layers,
                    None => self.layers(m, &index, basis)?,
                };
                let audiences = audiences(&layers);
                let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(kept) = kept.for_state(at) {
                    kept.layers[slot].get_or_insert(layers.clone());
                    kept.audiences[slot].get_or_insert(audiences.clone());
                }
                (layers, audiences)
            }
        };
        Ok(Stack {
            index,
            layers,
            audiences,
        })
    }

    /// The `keep` best rows of `item` in the state of `m` (`keep` the most a request may ask
    /// for: the same for every call): kept ones, or computed (and kept); `None` if the item has
    /// no audience.
    pub fn rows(
        &self,
        m: &Merge<'_>,
        basis: Basis,
        item: &str,
        keep: usize,
    ) -> Result<Option<Arc<CoRows>>, ApiError> {
        let slot = basis.index();
        let index = m.co_index(basis)?;
        let Some(at) = m.state_id else {
            let layers = self.layers(m, &index, basis)?;
            return Ok(rows_of(&index, &layers, item, keep));
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
        let rows = rows_of(&index, &layers, item, keep);
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
            // Blocks finished since are read over the kept layer and taken into it.
            let since = blocks_since(&read, &done).filter(|_| chain.len() == 1);
            let chain = Arc::new(match since {
                Some(since) => {
                    let upper = build(&chain, &since)?;
                    let mut one = (*chain[0]).clone();
                    one.absorb(&upper);
                    vec![Arc::new(one)]
                }
                None => vec![build(&[], &done)?],
            });
            let mut kept = self.finished.lock().unwrap_or_else(|e| e.into_inner());
            kept[slot] = Some(((version, done), chain.clone()));
            chain
        };
        let next = m.next_offsets(&open);
        let mut kept = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = &mut kept[slot] {
            let same = Arc::ptr_eq(&o.finished, &chain)
                && o.open == open
                && o.covered.keys().eq(next.keys());
            if same && o.covered == next {
                return Ok(o.layers.clone());
            }
            if same
                && o.covered
                    .iter()
                    .any(|(p, c)| next.get(p).is_some_and(|n| n < c))
            {
                // A request of an older state than the one kept: read for it alone.
                drop(kept);
                let mut layers = (*chain).clone();
                layers.push(build(&chain, &open)?);
                return Ok(Arc::new(layers));
            }
            if same && o.increments < OPEN_REFRESH {
                if let Some(deltas) =
                    m.journal_since(&open, &o.covered, &next, speed_store::co_occurrence)?
                {
                    let under = o.layers.clone();
                    let upper = {
                        let layers = under.iter().map(|l| &**l).collect();
                        let under = Merged { index, layers };
                        Overlay::build(&under, basis, |prefix, f| {
                            for (key, partial) in &deltas {
                                if key.encode().starts_with(prefix) {
                                    f(key.clone(), partial.clone());
                                }
                            }
                            Ok(())
                        })?
                    };
                    let mut layers = (*under).clone();
                    let first_delta = chain.len() + 1;
                    if layers.len() - first_delta >= OPEN_INCREMENTS {
                        let mut one = (*layers[first_delta]).clone();
                        for l in &layers[first_delta + 1..] {
                            one.absorb(l);
                        }
                        one.absorb(&upper);
                        layers.truncate(first_delta);
                        layers.push(Arc::new(one));
                    } else {
                        layers.push(Arc::new(upper));
                    }
                    o.layers = Arc::new(layers);
                    o.covered = next;
                    o.increments += 1;
                    self.journal_steps.fetch_add(1, Ordering::Relaxed);
                    return Ok(o.layers.clone());
                }
            }
        }
        let mut layers = (*chain).clone();
        layers.push(build(&chain, &open)?);
        let layers = Arc::new(layers);
        kept[slot] = Some(OpenLayers {
            finished: chain,
            open,
            covered: next,
            layers: layers.clone(),
            increments: 0,
        });
        Ok(layers)
    }
}

fn rows_of(index: &CoIndex, layers: &Layers, item: &str, keep: usize) -> Option<Arc<CoRows>> {
    let layers = layers.iter().map(|l| &**l).collect();
    Merged { index, layers }.rows(item, keep).map(Arc::new)
}

/// Items that co-occur with `item`.
pub fn for_item(
    state: &ServingState,
    co_rows: &CoMemo,
    item: &str,
    basis: Basis,
    limit: usize,
) -> Result<Value, ApiError> {
    state.with_merge(|m| {
        let Some(rows) = co_rows.rows(m, basis, item, state.cfg.serve.max_limit)? else {
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
pub fn for_user(
    state: &ServingState,
    co_rows: &CoMemo,
    windows: &TotalsMemo,
    user: &str,
    limit: usize,
) -> Result<Value, ApiError> {
    state.with_merge(|m| {
        let viewed = history(m, Basis::View, user)?;
        let bought = history(m, Basis::Purchase, user)?;
        if viewed.is_empty() && bought.is_empty() {
            let totals = item_totals(windows, m, Window::All, 0)?;
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
        // Scores summed over the seeds' rows by item number: per candidate, its score and
        // which seeds (by position) it came from; names looked up for the chosen ones only.
        let stack = co_rows.stack(m, Basis::View)?;
        let merged = Merged {
            index: &stack.index,
            layers: stack.layers.iter().map(|l| &**l).collect(),
        };
        let n = merged.items();
        let audience = &stack.audiences;
        let mut excluded: Vec<u32> = bought.keys().filter_map(|i| merged.item(i)).collect();
        excluded.sort_unstable();
        let mut score = vec![0f64; n];
        let mut from = vec![0u16; n];
        let mut seen: Vec<u32> = Vec::new();
        let mut counter = Counter::new(n);
        for (at, (seed, _)) in recent.iter().enumerate() {
            let Some(id) = merged.item(seed) else {
                continue;
            };
            let n_a = u64::from(audience[id as usize]);
            if n_a == 0 {
                continue;
            }
            merged.each_count(id, &mut counter, |other, co| {
                let o = other as usize;
                let users = u64::from(audience[o]).max(1);
                if from[o] == 0 {
                    seen.push(other);
                }
                score[o] += f64::from(co) / (n_a as f64 * users as f64).sqrt();
                from[o] |= 1 << at;
            });
        }
        seen.retain(|o| excluded.binary_search(o).is_err());
        // Ties are broken by name, so only the candidates scoring at least the `limit`-th best
        // score need theirs.
        if seen.len() > limit && limit > 0 {
            let mut scores: Vec<f64> = seen.iter().map(|&o| score[o as usize]).collect();
            let (_, &mut nth, _) = scores.select_nth_unstable_by(limit - 1, |a, b| b.total_cmp(a));
            seen.retain(|&o| score[o as usize].total_cmp(&nth).is_ge());
        }
        let mut rows: Vec<(&Name, f64, u16)> = seen
            .iter()
            .filter_map(|&o| Some((merged.name_of(o)?, score[o as usize], from[o as usize])))
            .collect();
        top_n(&mut rows, limit, |a, b| {
            b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0))
        });
        let items: Vec<Value> = rows
            .iter()
            .map(|(i, s, from)| {
                let because: Vec<&str> = (recent.iter().enumerate())
                    .filter(|(at, _)| from & (1 << at) != 0)
                    .map(|(_, (seed, _))| seed.as_str())
                    .collect();
                json!({"item": i, "score": s, "because": because})
            })
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
