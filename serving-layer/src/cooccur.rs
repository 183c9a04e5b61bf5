//! Co-occurrence counted over dense ids.
//!
//! Counting the items that co-occur with one item reads the history of every user in its
//! audience: thousands of histories for a popular item. Read as merged view partials, each is a
//! lookup of an encoded key in the batch version and a read of every speed block past it. Here
//! the batch version's audiences and histories of one basis are indexed once per version
//! ([`CoIndex`], built on first use) as lists of numbers, and what the speed layer's blocks past
//! the version add ([`Overlay`]) is read once per state with one scan per view. Counting is then
//! a walk over integer lists into an array.
//!
//! Both views are unions ([`strata_common::views::Set`] and the names of
//! [`strata_common::views::Recent`]), so the merged audience or history is the batch's list plus
//! the overlay's additions, and the rows equal those counted from the merged partials.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use strata_common::audience_file::{count_row, Audiences, RowFile};
use strata_common::views::{at_id, Basis, FastMap, Interner, Name, Partial, ViewKey};

use crate::error::ApiError;
use strata_common::version_file::VersionFile;

/// One item that co-occurs with another.
pub struct CoRow {
    pub item: Name,
    /// Cosine similarity of the two audiences.
    pub score: f64,
    /// Users whose history holds both items.
    pub co: u64,
    /// Users whose history holds this item.
    pub users: u64,
}

/// An item's audience size and its co-occurrence rows, best first.
pub struct CoRows {
    /// Users whose history holds the item.
    pub users: u64,
    pub rows: Vec<CoRow>,
}

/// The two kinds of names, numbered apart.
#[derive(Clone, Copy)]
enum Kind {
    Item = 0,
    User = 1,
}

/// The two views counted over: an item's audience (users) and a user's history (items).
#[derive(Clone, Copy)]
enum Side {
    Audience = 0,
    History = 1,
}

const SIDES: [Side; 2] = [Side::Audience, Side::History];

impl Side {
    /// What a list of this side belongs to, and what it holds.
    fn kinds(self) -> (Kind, Kind) {
        match self {
            Side::Audience => (Kind::Item, Kind::User),
            Side::History => (Kind::User, Kind::Item),
        }
    }

    /// The prefix of the encoded keys of this side's view of `basis`.
    fn prefix(self, basis: Basis) -> Vec<u8> {
        let name = Name::default();
        match self {
            Side::Audience => ViewKey::ItemUsers { basis, item: name },
            Side::History => ViewKey::UserItems { basis, user: name },
        }
        .encode()
    }
}

/// The owner and members of an audience or history entry.
fn entry<'a>(key: &'a ViewKey, p: &'a Partial) -> Option<(&'a Name, Vec<&'a Name>)> {
    match (key, p) {
        (ViewKey::ItemUsers { item, .. }, Partial::Set(s)) => Some((item, s.0.iter().collect())),
        (ViewKey::UserItems { user, .. }, Partial::Recent(r)) => Some((user, r.0.keys().collect())),
        _ => None,
    }
}

/// One basis's item audiences and user histories in a batch version, by number: items and users
/// are numbered from 0, each list sorted.
#[derive(Default)]
pub struct CoIndex {
    /// By [`Kind`].
    ids: [Interner; 2],
    /// By [`Side`], then by the owner's number.
    lists: [Vec<Vec<u32>>; 2],
    /// The items' co-occurrence counts in the version alone, counted on first use.
    memo: RowMemo,
    /// The items' audience sizes in the version alone.
    sizes: Sizes,
    /// The rows the batch layer counted at publish (every item's, up to the file's cap), read
    /// per request instead of counted; only with the numbering they were counted in (the
    /// version's audiences file).
    rows: Option<RowFile>,
}

/// Co-occurrence counts kept for what never changes (a batch version, or what a layer adds to
/// it): per item, (other item, users holding both).
struct RowMemo {
    rows: Mutex<KeptRows>,
    /// The most pairs kept.
    limit: usize,
}

/// What is derived once from what never changes (a batch version, or a version with one layer
/// over it). A copy of a layer (made to take another layer into it) derives anew.
struct Derived<T>(OnceLock<T>);

impl<T> Default for Derived<T> {
    fn default() -> Self {
        Derived(OnceLock::new())
    }
}

impl<T> Clone for Derived<T> {
    fn clone(&self) -> Self {
        Derived::default()
    }
}

/// Every item's audience size, by number.
type Sizes = Derived<Arc<Vec<u32>>>;

/// A layer's users by the items of their histories in the index ([`Overlay::index_users`]):
/// where each item's users start, then the users.
type ByItem = Derived<(Vec<u32>, Vec<u32>)>;

impl Default for RowMemo {
    fn default() -> Self {
        RowMemo::holding(INDEX_ROW_PAIRS)
    }
}

/// A copy of a layer (made to take another layer into it) counts anew.
impl Clone for RowMemo {
    fn clone(&self) -> Self {
        RowMemo::holding(self.limit)
    }
}

/// How many pairs a row memo keeps in `mb` MiB (8 bytes a pair).
pub fn memo_pairs(mb: usize) -> usize {
    (mb << 20) / 8
}

#[derive(Default)]
struct KeptRows {
    pairs: usize,
    by_item: FastMap<u32, Arc<Vec<(u32, u32)>>>,
    /// In the order counted, the first to go when more than the memo's limit are held.
    order: VecDeque<u32>,
}

/// Pairs of co-occurrence counts one [`RowMemo`] holds at most (8 bytes each), across items.
pub const INDEX_ROW_PAIRS: usize = 4 << 20;

impl RowMemo {
    fn holding(limit: usize) -> Self {
        RowMemo {
            rows: Mutex::default(),
            limit,
        }
    }

    /// The kept row of `seed`, if any.
    fn kept(&self, seed: u32) -> Option<Arc<Vec<(u32, u32)>>> {
        let rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        rows.by_item.get(&seed).cloned()
    }

    /// The kept row of `seed`, or `count`'s (then kept, the oldest rows going first past
    /// the memo's limit; a row longer than that is not kept).
    fn row(&self, seed: u32, count: impl FnOnce() -> Vec<(u32, u32)>) -> Arc<Vec<(u32, u32)>> {
        let kept = |rows: &KeptRows| rows.by_item.get(&seed).cloned();
        if let Some(row) = kept(&self.rows.lock().unwrap_or_else(|e| e.into_inner())) {
            return row;
        }
        let row = Arc::new(count());
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = kept(&rows) {
            return found;
        }
        if row.len() > self.limit {
            return row;
        }
        while rows.pairs + row.len() > self.limit {
            let Some(old) = rows.order.pop_front() else {
                break;
            };
            if let Some(r) = rows.by_item.remove(&old) {
                rows.pairs -= r.len();
            }
        }
        rows.pairs += row.len();
        rows.by_item.insert(seed, row.clone());
        rows.order.push_back(seed);
        row
    }
}

impl CoIndex {
    /// Indexes the audiences and histories of `basis` in a batch version's views.
    pub fn build(views: &VersionFile, basis: Basis) -> Result<Self, ApiError> {
        let mut ix = CoIndex::default();
        for side in SIDES {
            let (owner, member) = side.kinds();
            views.scan(&side.prefix(basis), None, &mut |key, p| {
                let Some((name, members)) = entry(&key, &p) else {
                    return;
                };
                let at = ix.ids[owner as usize].id(name);
                let ids = &mut ix.ids[member as usize];
                let members: Vec<u32> = members.into_iter().map(|m| ids.id(m)).collect();
                at_id(&mut ix.lists[side as usize], at).extend(members);
            })?;
        }
        for side in SIDES {
            let owners = ix.ids[side.kinds().0 as usize].names.len();
            let lists = &mut ix.lists[side as usize];
            lists.resize(owners, Vec::new());
            for list in lists {
                list.sort_unstable();
                list.dedup();
                list.shrink_to_fit();
            }
        }
        Ok(ix)
    }

    /// This index with its row memo keeping at most `pairs` pairs (the layers over it keep as
    /// many each).
    pub fn keeping(mut self, pairs: usize) -> Self {
        self.memo = RowMemo::holding(pairs);
        self
    }

    /// The index from the audiences the batch layer numbered when it published the version
    /// ([`strata_common::audience_file`]), with the rows it counted then: each user's history
    /// is the items whose audience holds them, the same pairs as the history view's.
    pub fn from_audiences(a: Audiences, rows: Option<RowFile>) -> Self {
        let histories = a.histories();
        let audiences: Vec<Vec<u32>> = (0..a.items.len()).map(|i| a.of_item(i).to_vec()).collect();
        let mut ix = CoIndex::default();
        ix.ids[Kind::Item as usize] = Interner::from_names(a.items);
        ix.ids[Kind::User as usize] = Interner::from_names(a.users);
        ix.lists[Side::Audience as usize] = audiences;
        ix.lists[Side::History as usize] = histories;
        ix.rows = rows;
        ix
    }

    fn list(&self, side: Side, of: u32) -> &[u32] {
        let lists = &self.lists[side as usize];
        lists.get(of as usize).map_or(&[], Vec::as_slice)
    }

    /// The co-occurrence counts of item `seed` in the version alone, counted here: every other
    /// item a user of its audience holds, with the number of such users. A version never
    /// changes, so they are counted once and kept (up to the memo's limit of pairs across items).
    fn row(&self, seed: u32) -> Arc<Vec<(u32, u32)>> {
        self.memo.row(seed, || {
            let mut counts = vec![0u32; self.ids[Kind::Item as usize].names.len()];
            count_row(
                seed,
                self.list(Side::Audience, seed),
                |user| self.list(Side::History, user),
                &mut counts,
            )
        })
    }

    /// Calls `f` with each (other item, count) of item `seed`'s row in the version alone: a
    /// kept row, or the row the batch layer counted (read from its file, not kept: its bytes
    /// stay in the page cache), or one counted here (and kept), as for a row the file does not
    /// hold or one it holds that does not decode (given none of it, [`RowFile::for_each`]).
    fn row_each(&self, seed: u32, mut f: impl FnMut(u32, u32)) {
        if let Some(row) = self.memo.kept(seed) {
            for &(other, co) in row.iter() {
                f(other, co);
            }
            return;
        }
        match self
            .rows
            .as_ref()
            .and_then(|file| file.for_each(seed, &mut f))
        {
            Some(Ok(())) => return,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "a precounted row cannot be read; counting it")
            }
            None => {}
        }
        for &(other, co) in self.row(seed).iter() {
            f(other, co);
        }
    }
}

/// Counts by item number into a dense array, and the items counted, in the order first seen;
/// reused from one item to the next.
pub struct Counter {
    counts: Vec<u32>,
    seen: Vec<u32>,
}

impl Counter {
    pub fn new(items: usize) -> Self {
        Counter {
            counts: vec![0; items],
            seen: Vec::new(),
        }
    }

    fn bump(&mut self, item: u32, by: u32) {
        let c = &mut self.counts[item as usize];
        if *c == 0 {
            self.seen.push(item);
        }
        *c += by;
    }

    /// The count of `item`, taken: it is 0 from now on (and still among the items seen).
    fn take_one(&mut self, item: u32) -> u32 {
        std::mem::take(&mut self.counts[item as usize])
    }

    /// The counts taken, unordered; the counter is empty again.
    pub fn take(&mut self) -> Vec<(u32, u32)> {
        let counts = &mut self.counts;
        (self.seen.drain(..))
            .map(|item| (item, std::mem::take(&mut counts[item as usize])))
            .collect()
    }

    /// Calls `f` with each count and empties the counter.
    pub fn drain(&mut self, mut f: impl FnMut(u32, u32)) {
        for item in self.seen.drain(..) {
            f(item, std::mem::take(&mut self.counts[item as usize]));
        }
    }
}

/// What some of the speed layer's blocks past a batch version add to its [`CoIndex`] and to the
/// layers read before (under) this one: users and items none of them holds (numbered after
/// theirs), and the audience members and history items their lists lack. A partition's blocks
/// before the one being written never change, so their layer can be read once and kept while
/// they stay the same; the block being written is then a layer over it, read for each state.
#[derive(Clone, Default)]
pub struct Overlay {
    /// Audience sizes over the index and this layer alone, kept for when this is the lowest
    /// layer.
    sizes: Sizes,
    /// Per item of the index, the users this layer adds history to whose history in the index
    /// holds it.
    by_item: ByItem,
    /// Per seed: what this layer adds to its counts over the index, kept for when this is the
    /// lowest layer (up to as many pairs as the index's row memo).
    deltas: RowMemo,
    /// By [`Kind`]: the names none of the layers under this one numbers, numbered from `first`.
    ids: [Interner; 2],
    first: [usize; 2],
    /// By [`Side`]: what each owner's list gains.
    added: [FastMap<u32, Vec<u32>>; 2],
}

impl Overlay {
    /// Reads the speed layer's partials of `basis` through `scan` (called with a view's key
    /// prefix; it calls back once per key and block) as a layer over `under`.
    pub fn build(
        under: &Merged<'_>,
        basis: Basis,
        mut scan: impl FnMut(&[u8], &mut dyn FnMut(ViewKey, Partial)) -> Result<(), ApiError>,
    ) -> Result<Self, ApiError> {
        let mut o = Overlay {
            first: [under.count(Kind::Item), under.count(Kind::User)],
            deltas: RowMemo::holding(under.index.memo.limit),
            ..Overlay::default()
        };
        for side in SIDES {
            let (owner, member) = side.kinds();
            scan(&side.prefix(basis), &mut |key, p| {
                let Some((name, members)) = entry(&key, &p) else {
                    return;
                };
                let mut number = |kind: Kind, name: &Name| {
                    under.id(kind, name).unwrap_or_else(|| {
                        let k = kind as usize;
                        (o.first[k] + o.ids[k].id(name) as usize) as u32
                    })
                };
                let at = number(owner, name);
                let lacking: Vec<u32> = members
                    .into_iter()
                    .map(|m| number(member, m))
                    .filter(|&m| !under.holds(side, at, m))
                    .collect();
                o.added[side as usize]
                    .entry(at)
                    .or_default()
                    .extend(lacking);
            })?;
        }
        for list in o.added.iter_mut().flat_map(|a| a.values_mut()) {
            list.sort_unstable();
            list.dedup();
        }
        Ok(o)
    }

    /// Takes in `upper`, a layer read over this one (and what is under it), so that the two
    /// are read as one.
    pub fn absorb(&mut self, upper: &Overlay) {
        for k in 0..2 {
            debug_assert_eq!(upper.first[k], self.first[k] + self.ids[k].names.len());
            for name in &upper.ids[k].names {
                self.ids[k].id(name);
            }
        }
        for side in 0..2 {
            for (&owner, list) in &upper.added[side] {
                let mine = self.added[side].entry(owner).or_default();
                mine.extend_from_slice(list);
                mine.sort_unstable();
                mine.dedup();
            }
        }
    }

    fn added(&self, side: Side, of: u32) -> &[u32] {
        self.added[side as usize]
            .get(&of)
            .map_or(&[], Vec::as_slice)
    }

    /// The users this layer adds history to whose history in `index` holds `item`, indexed
    /// on first use: one step per item of their histories in the index.
    fn index_users(&self, index: &CoIndex, item: u32) -> &[u32] {
        let (starts, users) = self.by_item.0.get_or_init(|| {
            let items = index.ids[Kind::Item as usize].names.len();
            let mut starts = vec![0u32; items + 1];
            let added = &self.added[Side::History as usize];
            for &user in added.keys() {
                for &i in index.list(Side::History, user) {
                    starts[i as usize + 1] += 1;
                }
            }
            for i in 0..items {
                starts[i + 1] += starts[i];
            }
            let mut at = starts.clone();
            let mut users = vec![0u32; starts[items] as usize];
            for &user in added.keys() {
                for &i in index.list(Side::History, user) {
                    users[at[i as usize] as usize] = user;
                    at[i as usize] += 1;
                }
            }
            (starts, users)
        });
        match (starts.get(item as usize), starts.get(item as usize + 1)) {
            (Some(&from), Some(&to)) => &users[from as usize..to as usize],
            _ => &[],
        }
    }
}

/// A batch version's index and the layers read over it, lowest first: the merged audiences and
/// histories.
pub struct Merged<'a> {
    pub index: &'a CoIndex,
    pub layers: Vec<&'a Overlay>,
}

impl Merged<'_> {
    /// The number of a name of `kind`, in the index's numbering or one of the layers'.
    fn id(&self, kind: Kind, name: &str) -> Option<u32> {
        let k = kind as usize;
        self.index.ids[k].get(name).or_else(|| {
            (self.layers.iter())
                .find_map(|l| Some((l.first[k] + l.ids[k].get(name)? as usize) as u32))
        })
    }

    /// How many names of `kind` are numbered.
    fn count(&self, kind: Kind) -> usize {
        let k = kind as usize;
        let layers: usize = self.layers.iter().map(|l| l.ids[k].names.len()).sum();
        self.index.ids[k].names.len() + layers
    }

    fn item_name(&self, id: u32) -> Option<&Name> {
        let k = Kind::Item as usize;
        let mut at = id as usize;
        for names in std::iter::once(&self.index.ids[k].names)
            .chain(self.layers.iter().map(|l| &l.ids[k].names))
        {
            match names.get(at) {
                Some(name) => return Some(name),
                None => at -= names.len(),
            }
        }
        None
    }

    /// The merged list of one side: the index's, then what each layer adds.
    fn list(&self, side: Side, of: u32) -> impl Iterator<Item = u32> + '_ {
        let layers = self.layers.iter().flat_map(move |l| l.added(side, of));
        self.index.list(side, of).iter().chain(layers).copied()
    }

    fn holds(&self, side: Side, of: u32, member: u32) -> bool {
        self.index.list(side, of).binary_search(&member).is_ok()
            || (self.layers.iter()).any(|l| l.added(side, of).binary_search(&member).is_ok())
    }

    fn len(&self, side: Side, of: u32) -> usize {
        let layers: usize = self.layers.iter().map(|l| l.added(side, of).len()).sum();
        self.index.list(side, of).len() + layers
    }

    /// Co-occurrence rows for one item, best first, the `keep` best of them; `None` if its
    /// audience is empty.
    ///
    /// The batch version's counts of the item ([`CoIndex::row`], counted once per version) plus
    /// what the layers change: histories only grow, so a user of the version's audience adds
    /// the items the layers add to their history, and a user the layers add to the audience
    /// adds their whole merged history. The cost grows with the item's audience in the version
    /// (one look per member at what the layers add) and with what the layers add, not with
    /// the histories of the version's audience.
    pub fn rows(&self, item: &str, keep: usize) -> Option<CoRows> {
        let seed = self.id(Kind::Item, item)?;
        let n_a = self.len(Side::Audience, seed) as u64;
        if n_a == 0 {
            return None;
        }
        // By number first; names for the `keep` best only.
        let mut rows: Vec<(u32, f64, u64, u64)> = (self.counts(seed).into_iter())
            .map(|(other, co)| {
                let co = u64::from(co);
                let users = (self.len(Side::Audience, other) as u64).max(1);
                let score = co as f64 / (n_a as f64 * users as f64).sqrt();
                (other, score, co, users)
            })
            .collect();
        let name = |n: u32| self.item_name(n);
        let best = |a: &(u32, f64, u64, u64), b: &(u32, f64, u64, u64)| {
            (b.1.total_cmp(&a.1))
                .then_with(|| b.2.cmp(&a.2))
                .then_with(|| name(a.0).cmp(&name(b.0)))
        };
        if rows.len() > keep && keep > 0 {
            rows.select_nth_unstable_by(keep - 1, best);
        }
        rows.truncate(keep);
        rows.sort_unstable_by(best);
        let rows = (rows.into_iter())
            .filter_map(|(other, score, co, users)| {
                Some(CoRow {
                    item: self.item_name(other)?.clone(),
                    score,
                    co,
                    users,
                })
            })
            .collect();
        Some(CoRows { users: n_a, rows })
    }

    /// The number of an item, if it has one.
    pub fn item(&self, name: &str) -> Option<u32> {
        self.id(Kind::Item, name)
    }

    /// The name of a numbered item.
    pub fn name_of(&self, item: u32) -> Option<&Name> {
        self.item_name(item)
    }

    /// How many items are numbered.
    pub fn items(&self) -> usize {
        self.count(Kind::Item)
    }

    /// The size of an item's merged audience.
    pub fn audience(&self, item: u32) -> usize {
        self.len(Side::Audience, item)
    }

    /// The items that co-occur with item `seed`, unordered, each with the number of users
    /// whose history holds both.
    pub fn counts(&self, seed: u32) -> Vec<(u32, u32)> {
        let mut counter = Counter::new(self.count(Kind::Item));
        let mut row = Vec::new();
        self.each_count(seed, &mut counter, |o, c| row.push((o, c)));
        row
    }

    /// Calls `f` once with each item that co-occurs with item `seed` and its count, unordered:
    /// the version's row ([`CoIndex::row_each`]), each entry with what the layers change
    /// ([`Merged::count_upper`]) added, then what only the layers hold. `counter` (as long as
    /// [`Merged::items`], empty before and after) holds only what the layers change.
    pub fn each_count(&self, seed: u32, counter: &mut Counter, mut f: impl FnMut(u32, u32)) {
        self.count_upper(seed, counter);
        if self.in_index(seed) {
            (self.index).row_each(seed, |other, co| f(other, co + counter.take_one(other)));
        }
        counter.drain(|other, co| {
            if co > 0 {
                f(other, co)
            }
        });
    }

    fn in_index(&self, item: u32) -> bool {
        (item as usize) < self.index.ids[Kind::Item as usize].names.len()
    }

    /// What the layers add to the counts of `seed` in the version alone, into `counter`
    /// (empty). Histories only grow, so a user of the version's audience of `seed` adds the
    /// items the layers add to their history, and a user the layers add to the audience adds
    /// their whole merged history. The lowest layer's share (the finished blocks', which stands
    /// for seconds to minutes) is kept in it per seed ([`Overlay::deltas`]); over it, the
    /// users it added to the audience add what the layers over it add to their history, and the
    /// layers over it add theirs ([`Merged::count_layers`]).
    fn count_upper(&self, seed: u32, counter: &mut Counter) {
        let Some((&lowest, upper)) = self.layers.split_first() else {
            return;
        };
        let lower = Merged {
            index: self.index,
            layers: vec![lowest],
        };
        if (seed as usize) < lower.count(Kind::Item) {
            let low = lowest.deltas.row(seed, || {
                lower.count_layers(seed, 0, counter);
                counter.take()
            });
            for &(other, co) in low.iter() {
                counter.bump(other, co);
            }
        }
        for &user in lowest.added(Side::Audience, seed) {
            for layer in upper {
                for &other in layer.added(Side::History, user) {
                    if other != seed {
                        counter.bump(other, 1);
                    }
                }
            }
        }
        self.count_layers(seed, 1, counter);
    }

    /// What the layers from `from` on add to the counts of `seed`: the users of the version's
    /// audience of `seed` add what each adds to their history (each layer knows which of its
    /// users hold `seed` in the version: [`Overlay::index_users`]), and the users each adds to
    /// the audience add their whole merged history. The cost grows with what the layers add
    /// near `seed`, not with its audience.
    fn count_layers(&self, seed: u32, from: usize, counter: &mut Counter) {
        let layers = self.layers.get(from..).unwrap_or_default();
        for layer in layers {
            for &user in layer.index_users(self.index, seed) {
                for &other in layer.added(Side::History, user) {
                    if other != seed {
                        counter.bump(other, 1);
                    }
                }
            }
        }
        for layer in layers {
            for &user in layer.added(Side::Audience, seed) {
                for other in self.list(Side::History, user) {
                    if other != seed {
                        counter.bump(other, 1);
                    }
                }
            }
        }
    }

    /// Every numbered item's merged audience size, by number: the version's and the lowest
    /// layer's counted once for as long as they stand, the other layers' additions over them.
    pub fn audiences(&self) -> Vec<u32> {
        let lens = |m: &Merged<'_>| -> Arc<Vec<u32>> {
            Arc::new(
                (0..m.count(Kind::Item) as u32)
                    .map(|i| m.len(Side::Audience, i) as u32)
                    .collect(),
            )
        };
        let (below, upper) = match self.layers.split_first() {
            None => (self.index.sizes.0.get_or_init(|| lens(self)), &[][..]),
            Some((&lowest, upper)) => {
                let lower = Merged {
                    index: self.index,
                    layers: vec![lowest],
                };
                (lowest.sizes.0.get_or_init(|| lens(&lower)), upper)
            }
        };
        let mut all = Vec::with_capacity(self.count(Kind::Item));
        all.extend_from_slice(below);
        all.resize(self.count(Kind::Item), 0);
        for layer in upper {
            for (&item, users) in &layer.added[Side::Audience as usize] {
                all[item as usize] += users.len() as u32;
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use strata_common::views::{Recent, Set};

    use super::*;

    /// The views of some (user, item) events of one basis, keyed as the version stores them.
    fn views(events: &[(u32, u32)]) -> BTreeMap<Vec<u8>, (ViewKey, Partial)> {
        let basis = Basis::View;
        let mut audiences: BTreeMap<Name, BTreeSet<Name>> = BTreeMap::new();
        let mut histories: BTreeMap<Name, BTreeMap<Name, i64>> = BTreeMap::new();
        for (t, &(u, i)) in events.iter().enumerate() {
            let (user, item): (Name, Name) = (format!("u{u}").into(), format!("i{i}").into());
            audiences
                .entry(item.clone())
                .or_default()
                .insert(user.clone());
            histories.entry(user).or_default().insert(item, t as i64);
        }
        let mut out = BTreeMap::new();
        for (item, users) in audiences {
            let key = ViewKey::ItemUsers { basis, item };
            out.insert(key.encode(), (key, Partial::Set(Set(users))));
        }
        for (user, items) in histories {
            let key = ViewKey::UserItems { basis, user };
            out.insert(key.encode(), (key, Partial::Recent(Recent(items))));
        }
        out
    }

    fn layer(under: &Merged<'_>, events: &[(u32, u32)]) -> Overlay {
        let parts = views(events);
        Overlay::build(under, Basis::View, |prefix, f| {
            for (enc, (k, p)) in &parts {
                if enc.starts_with(prefix) {
                    f(k.clone(), p.clone());
                }
            }
            Ok(())
        })
        .expect("overlay")
    }

    /// Where item `item`'s row lies in the bytes of a rows file (start, end), from its table.
    fn row_span(bytes: &[u8], item: u32) -> (usize, usize) {
        let n = bytes.len();
        let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize;
        let body = le64(&bytes[n - 16..n - 8]);
        let entry = 12 + body + 16 * item as usize;
        let start = 12 + le64(&bytes[entry..entry + 8]);
        let len = u32::from_le_bytes(bytes[entry + 8..entry + 12].try_into().expect("4 bytes"));
        (start, start + len as usize)
    }

    /// The `keep` best rows of item `i{item}`, by name.
    fn named_rows(m: &Merged<'_>, item: u32, keep: usize) -> Vec<(Name, u64, u64)> {
        (m.rows(&format!("i{item}"), keep).into_iter())
            .flat_map(|r| r.rows)
            .map(|r| (r.item, r.co, r.users))
            .collect()
    }

    /// Rows counted from the merged sets of every event, the naive way.
    fn naive(events: &[(u32, u32)], item: u32) -> Vec<(Name, u64, u64)> {
        let mut histories: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for &(u, i) in events {
            histories.entry(u).or_default().insert(i);
        }
        let audience = |i: u32| histories.values().filter(|h| h.contains(&i)).count() as u64;
        let n_a = audience(item);
        let mut co: BTreeMap<u32, u64> = BTreeMap::new();
        for h in histories.values().filter(|h| h.contains(&item)) {
            for &other in h.iter().filter(|&&o| o != item) {
                *co.entry(other).or_default() += 1;
            }
        }
        let mut rows: Vec<(f64, Name, u64, u64)> = (co.into_iter())
            .map(|(o, c)| {
                let users = audience(o);
                let score = c as f64 / (n_a as f64 * users as f64).sqrt();
                (score, Name::from(format!("i{o}")), c, users)
            })
            .collect();
        rows.sort_by(|a, b| {
            (b.0.total_cmp(&a.0))
                .then_with(|| b.2.cmp(&a.2))
                .then_with(|| a.1.cmp(&b.1))
        });
        rows.into_iter().map(|(_, i, c, u)| (i, c, u)).collect()
    }

    #[test]
    fn rows_over_layers_equal_rows_of_every_event_counted_naively() {
        let mut seed = 5u64;
        let mut below = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) % n) as u32
        };
        for round in 0..40 {
            let (users, items) = (2 + below(40) as u64, 2 + below(30) as u64);
            let mut events: Vec<(u32, u32)> = (0..(20 + below(300)))
                .map(|_| (below(users), below(items)))
                .collect();
            // Users and items only the speed layer has seen, too.
            events.extend((0..10).map(|_| (users as u32 + below(5), items as u32 + below(4))));
            let cut = (events.len() / 2, events.len() * 3 / 4);
            let dir = tempfile::tempdir().expect("tempdir");
            let parts = views(&events[..cut.0]);
            let entries: Vec<(Vec<u8>, &Partial)> =
                parts.iter().map(|(enc, (_, p))| (enc.clone(), p)).collect();
            let version = strata_common::version_file::create(&dir.path().join("v"), &entries)
                .expect("version file");
            let scanned = CoIndex::build(&version, Basis::View).expect("index");
            // The same index from the audiences numbered at publish.
            let numbered = CoIndex::from_audiences(
                Audiences::of(parts.iter().map(|(_, (k, p))| (k, p)), Basis::View),
                None,
            );
            // And with every row counted at publish, read from the rows file.
            let audiences = Audiences::of(parts.iter().map(|(_, (k, p))| (k, p)), Basis::View);
            let row_path = dir.path().join("rows");
            let written = strata_common::audience_file::write_rows(
                &row_path,
                &audiences,
                &audiences.histories(),
                u64::MAX,
            )
            .expect("rows file");
            let file = RowFile::open(&row_path).expect("open").expect("rows file");
            assert_eq!(file.rows(), written.rows);
            for item in 0..audiences.items.len() as u32 {
                if let Some(row) = file.row(item) {
                    row.expect("a written row decodes");
                }
            }
            // And with only the costliest rows that fit in a few bytes written: the others are
            // counted when asked.
            let capped_path = dir.path().join("rows-capped");
            let capped = strata_common::audience_file::write_rows(
                &capped_path,
                &audiences,
                &audiences.histories(),
                u64::from(below(64)),
            )
            .expect("capped rows file");
            assert!(capped.rows <= written.rows && capped.bytes <= 64);
            let capped = CoIndex::from_audiences(
                Audiences::of(parts.iter().map(|(_, (k, p))| (k, p)), Basis::View),
                Some(
                    RowFile::open(&capped_path)
                        .expect("open")
                        .expect("rows file"),
                ),
            );
            // And with a rows file whose every row's last byte is damaged: each row is
            // refused whole and counted instead.
            let damaged_path = dir.path().join("rows-damaged");
            let mut bytes = std::fs::read(&row_path).expect("rows bytes");
            for item in 0..audiences.items.len() as u32 {
                if let Some(Ok(row)) = file.row(item) {
                    let (_, at) = row_span(&bytes, item);
                    if !row.is_empty() {
                        bytes[at - 1] |= 0x80;
                    }
                }
            }
            std::fs::write(&damaged_path, &bytes).expect("damaged rows");
            let damaged = CoIndex::from_audiences(
                Audiences::of(parts.iter().map(|(_, (k, p))| (k, p)), Basis::View),
                Some(
                    RowFile::open(&damaged_path)
                        .expect("open")
                        .expect("rows file"),
                ),
            );
            let precounted = CoIndex::from_audiences(audiences, Some(file));
            // And keeping no row at all (`serve.memo-mb = 0`), or only a few pairs.
            let unkept = CoIndex::build(&version, Basis::View)
                .expect("index")
                .keeping(0);
            let few = CoIndex::build(&version, Basis::View)
                .expect("index")
                .keeping(5);
            for (how, index) in [
                ("scanned", &scanned),
                ("numbered", &numbered),
                ("precounted", &precounted),
                ("capped", &capped),
                ("damaged", &damaged),
                ("unkept", &unkept),
                ("few kept", &few),
            ] {
                let under = Merged {
                    index,
                    layers: Vec::new(),
                };
                let first = layer(&under, &events[cut.0..cut.1]);
                let under = Merged {
                    index,
                    layers: vec![&first],
                };
                let second = layer(&under, &events[cut.1..]);
                let merged = Merged {
                    index,
                    layers: vec![&first, &second],
                };
                let rows = |item: u32| named_rows(&merged, item, usize::MAX);
                // Audience sizes by number, against a count of the users who saw each item.
                let audiences = merged.audiences();
                for item in 0..(items as u32 + 4) {
                    let users: BTreeSet<u32> = (events.iter())
                        .filter(|&&(_, i)| i == item)
                        .map(|&(u, _)| u)
                        .collect();
                    let got =
                        (merged.item(&format!("i{item}"))).map_or(0, |n| audiences[n as usize]);
                    assert_eq!(
                        got as usize,
                        users.len(),
                        "{how}, round {round}, audience of i{item}"
                    );
                }
                for item in 0..(items as u32 + 4) {
                    let want = naive(&events, item);
                    assert_eq!(rows(item), want, "{how}, round {round}, item i{item}");
                    // The best few alone are the first few of all.
                    let few = named_rows(&merged, item, 3);
                    assert_eq!(
                        few,
                        want[..want.len().min(3)],
                        "{how}, round {round}, i{item}, 3 best"
                    );
                    // Counted twice: the second time from the version's kept counts.
                    let again = rows(item);
                    let held = index.memo.rows.lock().map_or(0, |r| r.pairs);
                    assert!(held <= index.memo.limit, "{how}: {held} pairs kept");
                    assert_eq!(again, want, "{how}, round {round}, item i{item}, again");
                }
                // A third layer over them: the lowest layer's kept additions (counted above,
                // over the other two) still hold, and the rows equal those of every event.
                let more: Vec<(u32, u32)> = (0..(1 + below(40)))
                    .map(|_| (below(users + 6), below(items + 6)))
                    .collect();
                let third = layer(&merged, &more);
                let all: Vec<(u32, u32)> = events.iter().chain(&more).copied().collect();
                let over = Merged {
                    index,
                    layers: vec![&first, &second, &third],
                };
                for item in 0..(items as u32 + 6) {
                    assert_eq!(
                        named_rows(&over, item, usize::MAX),
                        naive(&all, item),
                        "{how}, round {round}, i{item}, a third layer"
                    );
                }
                // The two layers taken into one count the same.
                let mut one = first.clone();
                one.absorb(&second);
                let absorbed = Merged {
                    index,
                    layers: vec![&one],
                };
                for item in 0..(items as u32 + 4) {
                    assert_eq!(
                        named_rows(&absorbed, item, usize::MAX),
                        naive(&events, item),
                        "{how}, round {round}, item i{item}, absorbed"
                    );
                }
            }
        }
    }
}
