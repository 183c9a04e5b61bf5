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

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
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
        let members: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
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
    let bytes = audiences.encode()?;
    let mut file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(&bytes).map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))
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
        assert_eq!(read(&path).expect("read"), Some(a));
        assert_eq!(read(&dir.path().join("absent")).expect("read"), None);

        // Damage is reported, not read as other numbers.
        let mut bytes = std::fs::read(&path).expect("bytes");
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).expect("damage");
        assert!(read(&path).is_err());
    }
}
