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

use strata_common::views::{Basis, FastMap, Name, Partial, ViewKey};

use crate::error::ApiError;
use crate::state::LoadedBatch;

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

/// Names given numbers in order of first sight.
#[derive(Default)]
struct Ids {
    by_name: FastMap<Name, u32>,
    names: Vec<Name>,
}

impl Ids {
    fn get(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// The number of `name`, given the next one (from `first`) if it has none yet.
    fn intern(&mut self, name: &Name, first: usize) -> u32 {
        if let Some(&id) = self.by_name.get(name) {
            return id;
        }
        let id = (first + self.names.len()) as u32;
        self.by_name.insert(name.clone(), id);
        self.names.push(name.clone());
        id
    }
}

/// The prefix of the encoded keys of the item audiences of `basis`.
fn audience_prefix(basis: Basis) -> Vec<u8> {
    ViewKey::ItemUsers {
        basis,
        item: Name::default(),
    }
    .encode()
}

/// The prefix of the encoded keys of the user histories of `basis`.
fn history_prefix(basis: Basis) -> Vec<u8> {
    ViewKey::UserItems {
        basis,
        user: Name::default(),
    }
    .encode()
}

/// The list numbered `at`, made if there is none yet.
fn list_at(lists: &mut Vec<Vec<u32>>, at: u32) -> &mut Vec<u32> {
    let at = at as usize;
    if lists.len() <= at {
        lists.resize(at + 1, Vec::new());
    }
    &mut lists[at]
}

/// One basis's item audiences and user histories in a batch version, by number: users and items
/// are numbered from 0, each list sorted.
#[derive(Default)]
pub struct CoIndex {
    items: Ids,
    users: Ids,
    /// By item: the users of its audience.
    audience: Vec<Vec<u32>>,
    /// By user: the items of its history.
    history: Vec<Vec<u32>>,
}

impl CoIndex {
    /// Indexes the audiences and histories of `basis` among a version's views (sorted by encoded
    /// key, so each view is one range).
    pub fn build(batch: &LoadedBatch, basis: Basis) -> Self {
        let each = |prefix: Vec<u8>, f: &mut dyn FnMut(&ViewKey, &Partial)| {
            batch.range(&prefix, None).for_each(|(key, p)| f(key, p));
        };
        let mut ix = CoIndex::default();
        each(audience_prefix(basis), &mut |key, p| {
            if let (ViewKey::ItemUsers { item, .. }, Partial::Set(s)) = (key, p) {
                let item = ix.items.intern(item, 0);
                let users: Vec<u32> = s.0.iter().map(|u| ix.users.intern(u, 0)).collect();
                list_at(&mut ix.audience, item).extend(users);
            }
        });
        each(history_prefix(basis), &mut |key, p| {
            if let (ViewKey::UserItems { user, .. }, Partial::Recent(r)) = (key, p) {
                let user = ix.users.intern(user, 0);
                let items: Vec<u32> = r.0.keys().map(|i| ix.items.intern(i, 0)).collect();
                list_at(&mut ix.history, user).extend(items);
            }
        });
        ix.audience.resize(ix.items.names.len(), Vec::new());
        ix.history.resize(ix.users.names.len(), Vec::new());
        for list in ix.audience.iter_mut().chain(ix.history.iter_mut()) {
            list.sort_unstable();
            list.dedup();
            list.shrink_to_fit();
        }
        ix
    }

    fn audience_of(&self, item: u32) -> &[u32] {
        self.audience.get(item as usize).map_or(&[], Vec::as_slice)
    }

    fn history_of(&self, user: u32) -> &[u32] {
        self.history.get(user as usize).map_or(&[], Vec::as_slice)
    }
}

/// What some of the speed layer's blocks past a batch version add to its [`CoIndex`] and to the
/// layers read before (under) this one: users and items none of them holds (numbered after
/// theirs), and the audience members and history items their lists lack. A partition's blocks
/// before the one being written never change, so their layer can be read once and kept while
/// they stay the same; the block being written is then a layer over it, read for each state.
#[derive(Default)]
pub struct Overlay {
    items: Ids,
    users: Ids,
    audience: FastMap<u32, Vec<u32>>,
    history: FastMap<u32, Vec<u32>>,
}

impl Overlay {
    /// Reads the speed layer's partials of `basis` through `scan` (called with a view's key
    /// prefix; it calls back once per key and block) as a layer over `under`.
    pub fn build(
        under: &Merged<'_>,
        basis: Basis,
        mut scan: impl FnMut(&[u8], &mut dyn FnMut(ViewKey, Partial)) -> Result<(), ApiError>,
    ) -> Result<Self, ApiError> {
        let (first_item, first_user) = (under.items(), under.users());
        let mut o = Overlay::default();
        scan(&audience_prefix(basis), &mut |key, p| {
            if let (ViewKey::ItemUsers { item, .. }, Partial::Set(s)) = (key, p) {
                let item = under
                    .item_id(&item)
                    .unwrap_or_else(|| o.items.intern(&item, first_item));
                for u in &s.0 {
                    let user = under
                        .user_id(u)
                        .unwrap_or_else(|| o.users.intern(u, first_user));
                    if !under.lists_hold(|l| &l.audience, under.index.audience_of(item), item, user)
                    {
                        o.audience.entry(item).or_default().push(user);
                    }
                }
            }
        })?;
        scan(&history_prefix(basis), &mut |key, p| {
            if let (ViewKey::UserItems { user, .. }, Partial::Recent(r)) = (key, p) {
                let user = under
                    .user_id(&user)
                    .unwrap_or_else(|| o.users.intern(&user, first_user));
                for i in r.0.keys() {
                    let item = under
                        .item_id(i)
                        .unwrap_or_else(|| o.items.intern(i, first_item));
                    if !under.lists_hold(|l| &l.history, under.index.history_of(user), user, item) {
                        o.history.entry(user).or_default().push(item);
                    }
                }
            }
        })?;
        for list in o.audience.values_mut().chain(o.history.values_mut()) {
            list.sort_unstable();
            list.dedup();
        }
        Ok(o)
    }
}

/// A batch version's index and the layers read over it, lowest first: the merged audiences and
/// histories.
pub struct Merged<'a> {
    pub index: &'a CoIndex,
    pub layers: Vec<&'a Overlay>,
}

fn added(map: &FastMap<u32, Vec<u32>>, id: u32) -> &[u32] {
    map.get(&id).map_or(&[], Vec::as_slice)
}

impl Merged<'_> {
    /// The number of a name in the index's `own` numbering or one of the layers' (`of`).
    fn id<'a>(
        &'a self,
        own: &'a Ids,
        of: impl Fn(&'a Overlay) -> &'a Ids,
        name: &str,
    ) -> Option<u32> {
        own.get(name)
            .or_else(|| self.layers.iter().find_map(|l| of(l).get(name)))
    }

    fn item_id(&self, name: &str) -> Option<u32> {
        self.id(&self.index.items, |l| &l.items, name)
    }

    fn user_id(&self, name: &str) -> Option<u32> {
        self.id(&self.index.users, |l| &l.users, name)
    }

    fn item_name(&self, id: u32) -> Option<&Name> {
        let mut at = id as usize;
        for names in std::iter::once(&self.index.items.names)
            .chain(self.layers.iter().map(|l| &l.items.names))
        {
            match names.get(at) {
                Some(name) => return Some(name),
                None => at -= names.len(),
            }
        }
        None
    }

    fn items(&self) -> usize {
        let layers: usize = self.layers.iter().map(|l| l.items.names.len()).sum();
        self.index.items.names.len() + layers
    }

    fn users(&self) -> usize {
        let layers: usize = self.layers.iter().map(|l| l.users.names.len()).sum();
        self.index.users.names.len() + layers
    }

    /// Whether the list of `of` (the index's `own`, then each layer's in `lists`) holds `member`.
    fn lists_hold(
        &self,
        lists: impl Fn(&Overlay) -> &FastMap<u32, Vec<u32>>,
        own: &[u32],
        of: u32,
        member: u32,
    ) -> bool {
        own.binary_search(&member).is_ok()
            || (self.layers.iter()).any(|l| added(lists(l), of).binary_search(&member).is_ok())
    }

    fn audience(&self, item: u32) -> impl Iterator<Item = u32> + '_ {
        let layers = self
            .layers
            .iter()
            .flat_map(move |l| added(&l.audience, item));
        self.index.audience_of(item).iter().chain(layers).copied()
    }

    fn history(&self, user: u32) -> impl Iterator<Item = u32> + '_ {
        let layers = self
            .layers
            .iter()
            .flat_map(move |l| added(&l.history, user));
        self.index.history_of(user).iter().chain(layers).copied()
    }

    fn audience_len(&self, item: u32) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| added(&l.audience, item).len())
            .sum();
        self.index.audience_of(item).len() + layers
    }

    /// Co-occurrence rows for one item, best first; `None` if its audience is empty.
    pub fn rows(&self, item: &str) -> Option<Vec<CoRow>> {
        let seed = self.item_id(item)?;
        let mut counts = vec![0u32; self.items()];
        let mut seen: Vec<u32> = Vec::new();
        let mut n_a = 0u64;
        for user in self.audience(seed) {
            n_a += 1;
            for other in self.history(user) {
                if other == seed {
                    continue;
                }
                let c = &mut counts[other as usize];
                if *c == 0 {
                    seen.push(other);
                }
                *c += 1;
            }
        }
        if n_a == 0 {
            return None;
        }
        let mut rows: Vec<CoRow> = seen
            .into_iter()
            .filter_map(|other| {
                let co = u64::from(counts[other as usize]);
                let users = (self.audience_len(other) as u64).max(1);
                Some(CoRow {
                    item: self.item_name(other)?.clone(),
                    score: co as f64 / (n_a as f64 * users as f64).sqrt(),
                    co,
                    users,
                })
            })
            .collect();
        rows.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| b.co.cmp(&a.co))
                .then_with(|| a.item.cmp(&b.item))
        });
        Some(rows)
    }
}
