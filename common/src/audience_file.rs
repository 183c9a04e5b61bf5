//! A batch version's item audiences of one basis, by number: `audiences.<basis>` beside
//! `views.blocks`, written when the version is published from the same `ItemUsers` entries.
//!
//! The serving layer's co-occurrence index holds every item's audience and every user's history
//! by number. Building it from `views.blocks` means decoding and numbering every name of both
//! views, which grows with history (seconds at 10M events) and would sit between a version's
//! publication and its being served. The batch layer, which has the entries at hand, numbers
//! them once; the serving layer reads the numbers and derives the histories, which are the
//! same pairs seen from the other side (`views::contribute` adds both for each event).
//!
//! Format, little-endian:
//!
//! ```text
//!   magic "STRAUD01" | items u32 | users u32 | members u64
//!   item names, then user names, in number order: length u16 | bytes
//!   per item, the end of its members in the members array: u64
//!   members: user numbers u32, ascending within each item
//!   the byte count of everything before: u64
//! ```

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::varint;
use crate::views::{Basis, FastMap, Name, Partial, ViewKey};

const MAGIC: &[u8; 8] = b"STRAUD01";

/// The file name of `basis`'s audiences in a version directory.
pub fn file_name(basis: Basis) -> &'static str {
    match basis {
        Basis::View => "audiences.view",
        Basis::Purchase => "audiences.purchase",
    }
}

/// One basis's item audiences: items and users numbered from 0.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Audiences {
    pub items: Vec<Name>,
    pub users: Vec<Name>,
    /// Per item, the end of its members in `members` (the start is the previous item's end).
    pub ends: Vec<u64>,
    pub members: Vec<u32>,
}

impl Audiences {
    /// The `ItemUsers` entries of `basis` among `entries`, numbered: items in the entries'
    /// order, users in order of first sight.
    pub fn of<'a>(
        entries: impl IntoIterator<Item = (&'a ViewKey, &'a Partial)>,
        basis: Basis,
    ) -> Self {
        let mut a = Audiences::default();
        let mut users: FastMap<&'a str, u32> = FastMap::default();
        for (key, p) in entries {
            let (ViewKey::ItemUsers { basis: b, item }, Partial::Set(set)) = (key, p) else {
                continue;
            };
            if *b != basis {
                continue;
            }
            a.items.push(item.clone());
            let start = a.members.len();
            for user in &set.0 {
                let next = a.users.len() as u32;
                let n = *users.entry(user.as_str()).or_insert_with(|| {
                    a.users.push(user.clone());
                    next
                });
                a.members.push(n);
            }
            a.members[start..].sort_unstable();
            a.ends.push(a.members.len() as u64);
        }
        a
    }

    /// Each user's history by number: the items whose audience holds them, ascending (the same
    /// pairs as the history view's).
    pub fn histories(&self) -> Vec<Vec<u32>> {
        let mut sizes = vec![0u32; self.users.len()];
        for &u in &self.members {
            sizes[u as usize] += 1;
        }
        let mut histories: Vec<Vec<u32>> = sizes
            .iter()
            .map(|&n| Vec::with_capacity(n as usize))
            .collect();
        for item in 0..self.items.len() {
            for &u in self.of_item(item) {
                histories[u as usize].push(item as u32);
            }
        }
        histories
    }

    /// The user numbers of item `item`'s audience, ascending.
    pub fn of_item(&self, item: usize) -> &[u32] {
        let start = if item == 0 { 0 } else { self.ends[item - 1] } as usize;
        &self.members[start..self.ends[item] as usize]
    }

    fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(32 + self.members.len() * 4 + self.ends.len() * 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.items.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.users.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.members.len() as u64).to_le_bytes());
        for name in self.items.iter().chain(&self.users) {
            let len = u16::try_from(name.len())
                .map_err(|_| Error::Other(format!("a name of {} bytes", name.len())))?;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        for end in &self.ends {
            out.extend_from_slice(&end.to_le_bytes());
        }
        for m in &self.members {
            out.extend_from_slice(&m.to_le_bytes());
        }
        let len = out.len() as u64;
        out.extend_from_slice(&len.to_le_bytes());
        Ok(out)
    }

    fn decode(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(8)? != MAGIC {
            return Err("not an audiences file".into());
        }
        let n_items = r.u32()? as usize;
        let n_users = r.u32()? as usize;
        let n_members = r.u64()? as usize;
        let mut names = |n: usize| -> std::result::Result<Vec<Name>, String> {
            let mut out = Vec::with_capacity(n.min(bytes.len() / 2));
            for _ in 0..n {
                let len = u16::from_le_bytes(r.array()?) as usize;
                let s = std::str::from_utf8(r.take(len)?).map_err(|e| e.to_string())?;
                out.push(Name::from(s));
            }
            Ok(out)
        };
        let items = names(n_items)?;
        let users = names(n_users)?;
        let ends = (0..n_items)
            .map(|_| r.u64())
            .collect::<std::result::Result<Vec<u64>, _>>()?;
        let raw = r.take(n_members.checked_mul(4).ok_or("too many members")?)?;
        let members: Vec<u32> = raw.chunks_exact(4).map(le32).collect();
        let before = r.at as u64;
        if r.u64()? != before || r.at != bytes.len() {
            return Err("truncated or damaged (length check)".into());
        }
        let sound = ends.windows(2).all(|w| w[0] <= w[1])
            && ends.last().is_none_or(|&e| e as usize == n_members)
            && members.iter().all(|&m| (m as usize) < n_users);
        if !sound {
            return Err("member ranges or numbers out of bounds".into());
        }
        Ok(Audiences {
            items,
            users,
            ends,
            members,
        })
    }
}

/// Item `seed`'s co-occurrence row: every other item a user of its `audience` holds (through
/// `history`), with the number of such users, in the order first met. `counts` is scratch of one
/// zero per item, left zeroed.
pub fn count_row<'h>(
    seed: u32,
    audience: &[u32],
    history: impl Fn(u32) -> &'h [u32],
    counts: &mut [u32],
) -> Vec<(u32, u32)> {
    let mut seen: Vec<u32> = Vec::new();
    for &user in audience {
        for &other in history(user) {
            if other != seed {
                let c = &mut counts[other as usize];
                if *c == 0 {
                    seen.push(other);
                }
                *c += 1;
            }
        }
    }
    (seen.into_iter())
        .map(|o| (o, std::mem::take(&mut counts[o as usize])))
        .collect()
}

/// What counting an item's row costs: one step per history item of each audience member.
fn row_cost(a: &Audiences, histories: &[Vec<u32>], item: usize) -> u64 {
    (a.of_item(item).iter())
        .map(|&u| histories[u as usize].len() as u64)
        .sum()
}

/// At most this many bytes of rows per basis and version, the costliest rows first; the rows
/// left out are counted by the serving layer when asked.
pub const ROWS_BYTES_MAX: u64 = 1 << 30;

/// The file name of `basis`'s precounted rows in a version directory.
pub fn rows_file_name(basis: Basis) -> &'static str {
    match basis {
        Basis::View => "rows.view",
        Basis::Purchase => "rows.purchase",
    }
}

/// What [`write_rows`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowsWritten {
    pub rows: usize,
    pub entries: u64,
    pub bytes: u64,
}

/// How many rows are counted in parallel before they are written, in item order of cost.
const ROWS_AT_ONCE: usize = 256;

/// Counts the co-occurrence row of every item with an audience, costliest first, in parallel
/// (rayon), and writes them to `path` until `max_bytes` of rows are written; syncs it.
///
/// Format, little-endian:
///
/// ```text
///   magic "STRAROW2" | items u32
///   rows: per row, its entries in ascending order of the other item:
///         other item (the first as is, then the gap past the previous one) varint | users varint
///   per item: start u64 (u64::MAX if its row is not here) | bytes u32 | entries u32
///   the rows' byte count u64 | the byte count of everything before u64
/// ```
///
/// A row is a few bytes an entry (gaps between the items a popular item co-occurs with are
/// small), so every row of a version of 10M events fits in a few hundred MiB. Memory holds
/// [`ROWS_AT_ONCE`] rows at a time.
pub fn write_rows(
    path: &Path,
    a: &Audiences,
    histories: &[Vec<u32>],
    max_bytes: u64,
) -> Result<RowsWritten> {
    use rayon::prelude::*;
    use std::io::Write;
    let n = a.items.len();
    let mut order: Vec<(u64, u32)> = (0..n)
        .map(|i| (row_cost(a, histories, i), i as u32))
        .filter(|&(cost, _)| cost > 0)
        .collect();
    order.sort_unstable_by(|x, y| y.cmp(x));
    let total: u64 = order.iter().map(|&(c, _)| c).sum();
    let mut progress = crate::progress::Progress::new(
        format!("counting {} co-occurrence rows (steps)", order.len()),
        Some(total),
    );
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::new(file);
    let io = |e| Error::io(path, e);
    w.write_all(ROWS_MAGIC).map_err(io)?;
    w.write_all(&(n as u32).to_le_bytes()).map_err(io)?;
    let mut table = vec![(u64::MAX, 0u32, 0u32); n];
    let mut written = RowsWritten {
        rows: 0,
        entries: 0,
        bytes: 0,
    };
    'chunks: for chunk in order.chunks(ROWS_AT_ONCE) {
        let rows: Vec<(u32, u32, Vec<u8>)> = chunk
            .par_iter()
            .map_init(
                || vec![0u32; n],
                |counts, &(_, item)| {
                    let mut row = count_row(
                        item,
                        a.of_item(item as usize),
                        |u| &histories[u as usize],
                        counts,
                    );
                    row.sort_unstable();
                    (item, row.len() as u32, encode_row(&row))
                },
            )
            .collect();
        for (item, entries, bytes) in rows {
            if written.bytes + bytes.len() as u64 > max_bytes {
                break 'chunks;
            }
            // A row past 4 GiB is left to be counted when asked.
            let Ok(len) = u32::try_from(bytes.len()) else {
                continue;
            };
            table[item as usize] = (written.bytes, len, entries);
            w.write_all(&bytes).map_err(io)?;
            written.rows += 1;
            written.entries += u64::from(entries);
            written.bytes += bytes.len() as u64;
        }
        progress.inc(chunk.iter().map(|&(c, _)| c).sum());
    }
    for (start, bytes, entries) in &table {
        w.write_all(&start.to_le_bytes()).map_err(io)?;
        w.write_all(&bytes.to_le_bytes()).map_err(io)?;
        w.write_all(&entries.to_le_bytes()).map_err(io)?;
    }
    w.write_all(&written.bytes.to_le_bytes()).map_err(io)?;
    let before = 12 + written.bytes + 16 * n as u64 + 8;
    w.write_all(&before.to_le_bytes()).map_err(io)?;
    let file = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(written)
}

/// A row's entries (ascending by other item) in the rows file's form.
fn encode_row(row: &[(u32, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(row.len() * 3);
    let mut next = 0u32;
    for &(other, users) in row {
        varint::put(&mut out, u128::from(other - next));
        varint::put(&mut out, u128::from(users));
        next = other + 1;
    }
    out
}

const ROWS_MAGIC: &[u8; 8] = b"STRAROW2";

/// A version's precounted rows of one basis, read by item from its file when asked (the table
/// of where each row lies is held; the rows stay on disk, in the page cache when read often).
pub struct RowFile {
    file: std::fs::File,
    path: std::path::PathBuf,
    /// Per item: where its row starts in the rows, its bytes and entries; `None` if the file
    /// does not hold it.
    table: Vec<Option<(u64, u32, u32)>>,
}

/// A row's bytes as read, and its entries as decoded.
type RowScratch = (Vec<u8>, Vec<(u32, u32)>);

thread_local! {
    /// Reused from one row to the next.
    static ROW_SCRATCH: std::cell::RefCell<RowScratch> = Default::default();
}

impl RowFile {
    /// Opens the rows at `path`; `None` if there is no such file. A file of another format
    /// (a version published by an earlier release) is refused like a damaged one.
    pub fn open(path: &Path) -> Result<Option<RowFile>> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let corrupt = |d: &str| Error::corrupt(path.display().to_string(), d);
        let mut head = [0u8; 12];
        file.read_exact_at(&mut head, 0)
            .map_err(|e| Error::io(path, e))?;
        if &head[..8] != ROWS_MAGIC {
            return Err(corrupt("not a rows file of this format"));
        }
        let items = u64::from(le32(&head[8..12]));
        let mut tail = [0u8; 16];
        if size < 12 + 16 {
            return Err(corrupt("truncated"));
        }
        file.read_exact_at(&mut tail, size - 16)
            .map_err(|e| Error::io(path, e))?;
        let (body, before) = (le64(&tail[0..8]), le64(&tail[8..16]));
        let expected = (body.checked_add(12 + 16 * items + 8)).filter(|&b| b == before);
        if expected != Some(size - 8) {
            return Err(corrupt("truncated or damaged (length check)"));
        }
        let mut raw = vec![0u8; items as usize * 16];
        file.read_exact_at(&mut raw, 12 + body)
            .map_err(|e| Error::io(path, e))?;
        let mut table = Vec::with_capacity(items as usize);
        for c in raw.chunks_exact(16) {
            let (start, bytes, entries) = (le64(&c[0..8]), le32(&c[8..12]), le32(&c[12..16]));
            if start == u64::MAX {
                table.push(None);
            } else if start
                .checked_add(u64::from(bytes))
                .is_some_and(|e| e <= body)
            {
                table.push(Some((12 + start, bytes, entries)));
            } else {
                return Err(corrupt("a row past the end"));
            }
        }
        Ok(Some(RowFile {
            file,
            path: path.to_path_buf(),
            table,
        }))
    }

    /// How many rows the file holds.
    pub fn rows(&self) -> usize {
        self.table.iter().filter(|t| t.is_some()).count()
    }

    /// Calls `f` with each (other item, users) of item `item`'s row, if the file holds it. The
    /// row is read and decoded whole first: on an error (a row that does not decode), `f` was
    /// given none of it.
    pub fn for_each(&self, item: u32, mut f: impl FnMut(u32, u32)) -> Option<Result<()>> {
        let (start, bytes, entries) = (*self.table.get(item as usize)?)?;
        let items = self.table.len() as u64;
        Some(ROW_SCRATCH.with_borrow_mut(|(raw, row)| {
            raw.resize(bytes as usize, 0);
            (self.file.read_exact_at(raw, start)).map_err(|e| Error::io(&self.path, e))?;
            row.clear();
            let (mut at, mut next) = (0usize, 0u64);
            while at < raw.len() {
                let entry = varint::take(raw, &mut at).and_then(|gap| {
                    let other = next.checked_add(u64::try_from(gap).ok()?)?;
                    let users = u32::try_from(varint::take(raw, &mut at)?).ok()?;
                    (other < items).then_some((other as u32, users))
                });
                let Some((other, users)) = entry else {
                    break;
                };
                row.push((other, users));
                next = u64::from(other) + 1;
            }
            if at != raw.len() || row.len() != entries as usize {
                return Err(Error::corrupt(
                    self.path.display().to_string(),
                    format!("the row of item {item} does not decode"),
                ));
            }
            for &(other, users) in row.iter() {
                f(other, users);
            }
            Ok(())
        }))
    }

    /// Item `item`'s row, if the file holds it.
    pub fn row(&self, item: u32) -> Option<Result<Vec<(u32, u32)>>> {
        let mut row = Vec::new();
        let read = self.for_each(item, |o, c| row.push((o, c)))?;
        Some(read.map(|()| row))
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or("truncated")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// Writes `audiences` to `path` and syncs it.
pub fn write(path: &Path, audiences: &Audiences) -> Result<()> {
    crate::disk::write_synced(path, &audiences.encode()?)
}

/// Reads the audiences at `path`; `None` if there is no such file (a version published before
/// these files were written).
pub fn read(path: &Path) -> Result<Option<Audiences>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    Audiences::decode(&bytes)
        .map(Some)
        .map_err(|e| Error::corrupt(path.display().to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::Set;
    use std::collections::BTreeSet;

    fn audience(basis: Basis, item: &str, users: &[&str]) -> (ViewKey, Partial) {
        (
            ViewKey::ItemUsers {
                basis,
                item: Name::from(item),
            },
            Partial::Set(Set(users
                .iter()
                .map(|u| Name::from(*u))
                .collect::<BTreeSet<_>>())),
        )
    }

    #[test]
    fn a_row_that_does_not_decode_is_refused_whole() {
        // One user who saw three items: each item's row holds the two others.
        let entries = [
            audience(Basis::View, "i0", &["u0"]),
            audience(Basis::View, "i1", &["u0"]),
            audience(Basis::View, "i2", &["u0"]),
        ];
        let a = Audiences::of(entries.iter().map(|(k, p)| (k, p)), Basis::View);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(rows_file_name(Basis::View));
        let written = write_rows(&path, &a, &a.histories(), u64::MAX).expect("write rows");
        assert_eq!((written.rows, written.entries), (3, 6));
        // The last row's last varint cut (its high bit set): that row is an error, with none
        // of its entries given; the others read whole.
        let mut bytes = std::fs::read(&path).expect("bytes");
        bytes[12 + written.bytes as usize - 1] |= 0x80;
        std::fs::write(&path, &bytes).expect("damage a row");
        let file = RowFile::open(&path).expect("open").expect("rows file");
        let (mut failed, mut whole) = (0, 0);
        for item in 0..3 {
            let mut given = 0;
            match file.for_each(item, |_, _| given += 1) {
                Some(Err(_)) => {
                    assert_eq!(given, 0, "nothing of a damaged row is given");
                    failed += 1;
                }
                Some(Ok(())) => {
                    assert_eq!(given, 2, "row {item}");
                    whole += 1;
                }
                None => panic!("row {item} is in the file"),
            }
        }
        assert_eq!((failed, whole), (1, 2));
    }

    #[test]
    fn audiences_round_trip_by_name_and_ignore_other_keys() {
        let entries = [
            audience(Basis::View, "i1", &["u2", "u1"]),
            audience(Basis::Purchase, "i1", &["u9"]),
            audience(Basis::View, "i2", &["u3", "u2"]),
            audience(Basis::View, "i3", &[]),
            (
                ViewKey::Item(Name::from("i1")),
                Partial::Set(Set::default()),
            ),
        ];
        let a = Audiences::of(entries.iter().map(|(k, p)| (k, p)), Basis::View);
        let names = |item: usize| -> BTreeSet<&str> {
            a.of_item(item)
                .iter()
                .map(|&u| a.users[u as usize].as_str())
                .collect()
        };
        assert_eq!(
            a.items,
            vec![Name::from("i1"), Name::from("i2"), Name::from("i3")]
        );
        assert_eq!(names(0), BTreeSet::from(["u1", "u2"]));
        assert_eq!(names(1), BTreeSet::from(["u2", "u3"]));
        assert!(names(2).is_empty());
        assert_eq!(a.users.len(), 3, "each user numbered once");
        assert!(a.of_item(1).windows(2).all(|w| w[0] < w[1]), "ascending");

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(file_name(Basis::View));
        write(&path, &a).expect("write");
        assert_eq!(read(&path).expect("read").as_ref(), Some(&a));
        assert_eq!(read(&dir.path().join("absent")).expect("read"), None);

        // Rows counted at publish equal rows counted naively from the names.
        let histories = a.histories();
        let row_path = dir.path().join(rows_file_name(Basis::View));
        let written = write_rows(&row_path, &a, &histories, u64::MAX).expect("write rows");
        let file = RowFile::open(&row_path)
            .expect("open rows")
            .expect("rows file");
        let by_name = |row: Vec<(u32, u32)>| -> BTreeSet<(&str, u32)> {
            row.into_iter()
                .map(|(o, c)| (a.items[o as usize].as_str(), c))
                .collect()
        };
        let naive = |item: &str| -> BTreeSet<(&str, u32)> {
            let audience = |i: &str| -> BTreeSet<&str> {
                entries
                    .iter()
                    .filter_map(|(k, p)| match (k, p) {
                        (
                            ViewKey::ItemUsers {
                                basis: Basis::View,
                                item,
                            },
                            Partial::Set(s),
                        ) if item.as_str() == i => {
                            Some(s.0.iter().map(|u| u.as_str()).collect::<Vec<_>>())
                        }
                        _ => None,
                    })
                    .flatten()
                    .collect()
            };
            let mine = audience(item);
            ["i1", "i2", "i3"]
                .into_iter()
                .filter(|&o| o != item)
                .map(|o| (o, audience(o).intersection(&mine).count() as u32))
                .filter(|&(_, c)| c > 0)
                .collect()
        };
        for (n, item) in ["i1", "i2", "i3"].into_iter().enumerate() {
            let got = file.row(n as u32).map(|r| by_name(r.expect("row")));
            if naive(item).is_empty() {
                assert!(got.is_none_or(|g| g.is_empty()), "{item}");
            } else {
                assert_eq!(got, Some(naive(item)), "{item}");
            }
        }
        assert_eq!(file.rows(), 2, "rows of the items with an audience");
        assert_eq!(written.rows, 2);
        assert_eq!(written.entries, 2, "i1 and i2 co-occur once each way");
        let mut bytes = std::fs::read(&row_path).expect("bytes");
        bytes.pop();
        std::fs::write(&row_path, &bytes).expect("damage");
        assert!(
            RowFile::open(&row_path).is_err(),
            "a damaged rows file is refused"
        );

        // Damage is reported, not read as other numbers.
        let mut bytes = std::fs::read(&path).expect("bytes");
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).expect("damage");
        assert!(read(&path).is_err());
    }
}
