//! A batch version's views on disk, in blocks with an index, so that a reader holds in memory
//! only the first key of each block and reads a block from the file when a query asks for a key
//! in it (as a sorted string table does). What the serving layer holds of a version then grows
//! with the number of blocks, not with the views, and loading a version reads its index only.
//!
//! ```text
//! views.blocks  block* index footer
//!   block       entry*, about BLOCK_BYTES, in the order of the keys' encodings
//!   entry       key length (u32 LE) | key (ViewKey::encode) | value length (u32 LE) | value (postcard Partial)
//!   index       per block: first key length (u32 LE) | first key | offset (u64 LE) | length (u32 LE)
//!   footer      index offset (u64 LE) | index length (u64 LE) | entries (u64 LE) | MAGIC
//! ```
//!
//! Blocks are read with positioned reads (`pread`): the operating system's page cache keeps the
//! ones asked for often, outside the process's own memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::views::{Partial, ViewKey};
use crate::{Error, Result};

/// The last eight bytes of a version file.
pub const MAGIC: &[u8; 8] = b"STRATAB1";

/// A block is cut after the entry that takes it past this many bytes.
pub const BLOCK_BYTES: usize = 4096;

const FOOTER: usize = 32;

/// Writes `entries` (their keys strictly increasing in encoded form) to `path`, fsynced.
pub fn write(path: &Path, entries: &[(Vec<u8>, &Partial)]) -> Result<()> {
    let mut w = Writer::create(path)?;
    for (key, partial) in entries {
        w.push(key, partial)?;
    }
    w.finish()
}

/// Writes a version file entry by entry, keys strictly increasing in encoded form.
pub struct Writer {
    path: PathBuf,
    w: BufWriter<File>,
    index: Vec<u8>,
    block: Vec<u8>,
    /// The first key of the block being filled, and the last key written.
    first: Option<Vec<u8>>,
    last: Option<Vec<u8>>,
    offset: u64,
    entries: u64,
    value: Vec<u8>,
}

impl Writer {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(Writer {
            path: path.to_path_buf(),
            w: BufWriter::with_capacity(1 << 20, file),
            index: Vec::new(),
            block: Vec::with_capacity(2 * BLOCK_BYTES),
            first: None,
            last: None,
            offset: 0,
            entries: 0,
            value: Vec::new(),
        })
    }

    /// Adds the entry of `key` (encoded) and `partial`.
    pub fn push(&mut self, key: &[u8], partial: &Partial) -> Result<()> {
        let mut value = std::mem::take(&mut self.value);
        value.clear();
        value = postcard::to_extend(partial, value).map_err(|e| Error::Other(e.to_string()))?;
        let pushed = self.push_raw(key, &value);
        self.value = value;
        pushed
    }

    /// Adds an entry whose value is already encoded (read from another version file).
    pub fn push_raw(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        if let Some(last) = &self.last {
            if last.as_slice() >= key {
                return Err(Error::Other(format!(
                    "version entries out of key order: {:?} before {:?}",
                    ViewKey::decode(last),
                    ViewKey::decode(key)
                )));
            }
        }
        match &mut self.last {
            Some(last) => {
                last.clear();
                last.extend_from_slice(key);
            }
            None => self.last = Some(key.to_vec()),
        }
        self.first.get_or_insert_with(|| key.to_vec());
        self.block
            .extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.block.extend_from_slice(key);
        self.block
            .extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.block.extend_from_slice(value);
        self.entries += 1;
        if self.block.len() >= BLOCK_BYTES {
            self.flush_block()?;
        }
        Ok(())
    }

    fn flush_block(&mut self) -> Result<()> {
        if let Some(key) = self.first.take() {
            self.w
                .write_all(&self.block)
                .map_err(|e| Error::io(&self.path, e))?;
            self.index
                .extend_from_slice(&(key.len() as u32).to_le_bytes());
            self.index.extend_from_slice(&key);
            self.index.extend_from_slice(&self.offset.to_le_bytes());
            self.index
                .extend_from_slice(&(self.block.len() as u32).to_le_bytes());
            self.offset += self.block.len() as u64;
            self.block.clear();
        }
        Ok(())
    }

    /// Writes the last block, the index and the footer, and fsyncs the file.
    pub fn finish(mut self) -> Result<()> {
        self.flush_block()?;
        let path = self.path.clone();
        let io = |e| Error::io(&path, e);
        let index_len = self.index.len() as u64;
        self.w.write_all(&self.index).map_err(io)?;
        self.w.write_all(&self.offset.to_le_bytes()).map_err(io)?;
        self.w.write_all(&index_len.to_le_bytes()).map_err(io)?;
        self.w.write_all(&self.entries.to_le_bytes()).map_err(io)?;
        self.w.write_all(MAGIC).map_err(io)?;
        let file = (self.w)
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        file.sync_all().map_err(io)
    }
}

/// Writes `entries` to `path` (see [`write`]) and opens it.
pub fn create(path: &Path, entries: &[(Vec<u8>, &Partial)]) -> Result<VersionFile> {
    write(path, entries)?;
    VersionFile::open(path)
}

/// An open version file: its index in memory, its blocks read when asked for.
pub struct VersionFile {
    path: PathBuf,
    file: File,
    /// Per block: its first key, offset and length.
    blocks: Vec<(Box<[u8]>, u64, u32)>,
    entries: u64,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl VersionFile {
    /// Opens `path` and reads its index.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |e| Error::io(path, e);
        let corrupt = |what: &str| Error::corrupt(path.display().to_string(), what);
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        if size < FOOTER as u64 {
            return Err(corrupt("shorter than a version file's footer"));
        }
        let mut footer = [0u8; FOOTER];
        file.read_exact_at(&mut footer, size - FOOTER as u64)
            .map_err(io)?;
        if &footer[24..] != MAGIC {
            return Err(corrupt("not a version file (no STRATAB1 footer)"));
        }
        let (at, len) = (u64_at(&footer, 0), u64_at(&footer, 8));
        let (Some(at), Some(len), Some(entries)) = (at, len, u64_at(&footer, 16)) else {
            return Err(corrupt("footer"));
        };
        if at.checked_add(len) != Some(size - FOOTER as u64) {
            return Err(corrupt("index out of place"));
        }
        let mut index = vec![0u8; len as usize];
        file.read_exact_at(&mut index, at).map_err(io)?;
        let mut blocks = Vec::new();
        let mut i = 0usize;
        while i < index.len() {
            let parsed = (|| {
                let klen = u32_at(&index, i)? as usize;
                let key = index.get(i + 4..i + 4 + klen)?;
                let offset = u64_at(&index, i + 4 + klen)?;
                let blen = u32_at(&index, i + 12 + klen)?;
                Some((key.into(), offset, blen, i + 16 + klen))
            })();
            let Some((key, offset, blen, next)) = parsed else {
                return Err(corrupt("index entry"));
            };
            if offset + u64::from(blen) > at {
                return Err(corrupt("block out of place"));
            }
            blocks.push((key, offset, blen));
            i = next;
        }
        Ok(VersionFile {
            path: path.to_path_buf(),
            file,
            blocks,
            entries,
        })
    }

    /// Entries (view keys) in the file.
    pub fn len(&self) -> u64 {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Bytes of the index held in memory.
    pub fn index_bytes(&self) -> usize {
        (self.blocks.iter()).map(|(k, _, _)| k.len() + 32).sum()
    }

    fn block(&self, at: usize) -> Result<Vec<u8>> {
        let (_, offset, len) = &self.blocks[at];
        let mut buf = vec![0u8; *len as usize];
        self.file
            .read_exact_at(&mut buf, *offset)
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(buf)
    }

    /// The block that holds `key` if any does: the last whose first key is not after it.
    fn block_of(&self, key: &[u8]) -> Option<usize> {
        (self.blocks.partition_point(|(first, _, _)| &**first <= key)).checked_sub(1)
    }

    /// Calls `f` with each entry of block `at` (encoded key, encoded value) until it returns
    /// false; returns whether it never did.
    fn entries_of(&self, at: usize, f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<bool> {
        let block = self.block(at)?;
        let mut i = 0usize;
        while i < block.len() {
            let parsed = (|| {
                let klen = u32_at(&block, i)? as usize;
                let key = block.get(i + 4..i + 4 + klen)?;
                let vlen = u32_at(&block, i + 4 + klen)? as usize;
                let value = block.get(i + 8 + klen..i + 8 + klen + vlen)?;
                Some((key, value, i + 8 + klen + vlen))
            })();
            let Some((key, value, next)) = parsed else {
                return Err(Error::corrupt(
                    self.path.display().to_string(),
                    "block entry",
                ));
            };
            if !f(key, value) {
                return Ok(false);
            }
            i = next;
        }
        Ok(true)
    }

    fn decode_value(&self, value: &[u8]) -> Result<Partial> {
        postcard::from_bytes(value).map_err(|e| Error::corrupt(self.path.display().to_string(), e))
    }

    /// A reader of every entry in key order, a block at a time.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor {
            file: self,
            block: 0,
            entries: Vec::new(),
            at: 0,
        }
    }

    /// The partial stored under the encoded key `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<Partial>> {
        let Some(at) = self.block_of(key) else {
            return Ok(None);
        };
        let mut found = None;
        self.entries_of(at, &mut |k, v| {
            if k == key {
                found = Some(v.to_vec());
            }
            k < key
        })?;
        found.map(|v| self.decode_value(&v)).transpose()
    }

    /// Calls `f` with every entry whose encoded key starts with `prefix` and is at or after
    /// `from` (`None`: the prefix itself), in key order.
    pub fn scan(
        &self,
        prefix: &[u8],
        from: Option<&[u8]>,
        f: &mut dyn FnMut(ViewKey, Partial),
    ) -> Result<()> {
        let start = from.unwrap_or(prefix);
        let mut at = self.block_of(start).unwrap_or(0);
        let mut failed = None;
        while at < self.blocks.len() {
            let more = self.entries_of(at, &mut |k, v| {
                if k < start {
                    return true;
                }
                if !k.starts_with(prefix) {
                    return false;
                }
                let decoded = ViewKey::decode(k)
                    .ok_or_else(|| Error::corrupt(self.path.display().to_string(), "view key"))
                    .and_then(|key| Ok((key, self.decode_value(v)?)));
                match decoded {
                    Ok((key, p)) => {
                        f(key, p);
                        true
                    }
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                }
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
            if !more {
                break;
            }
            at += 1;
        }
        Ok(())
    }
}

/// Every entry of a version file in key order (encoded key, encoded value), read a block at a
/// time: for merging files without holding them.
pub struct Cursor<'a> {
    file: &'a VersionFile,
    /// The next block to read.
    block: usize,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    at: usize,
}

impl Cursor<'_> {
    /// The key of the next entry, `None` past the last; reads the next block when needed.
    pub fn key(&mut self) -> Result<Option<&[u8]>> {
        while self.at == self.entries.len() {
            if self.block == self.file.blocks.len() {
                return Ok(None);
            }
            self.entries.clear();
            self.at = 0;
            let entries = &mut self.entries;
            self.file.entries_of(self.block, &mut |k, v| {
                entries.push((k.to_vec(), v.to_vec()));
                true
            })?;
            self.block += 1;
        }
        Ok(Some(&self.entries[self.at].0))
    }

    /// Takes the next entry (after [`Cursor::key`] found one).
    pub fn take(&mut self) -> Option<(Vec<u8>, Vec<u8>)> {
        let e = self.entries.get_mut(self.at)?;
        self.at += 1;
        Some((std::mem::take(&mut e.0), std::mem::take(&mut e.1)))
    }

    /// Decodes an entry's value taken from this cursor.
    pub fn decode(&self, value: &[u8]) -> Result<Partial> {
        self.file.decode_value(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::{ItemStats, Set};

    fn partial(i: u64) -> Partial {
        if i.is_multiple_of(3) {
            Partial::Set(Set((0..i % 50).map(|u| format!("u{u}").into()).collect()))
        } else {
            Partial::Item(ItemStats {
                views: i,
                ..ItemStats::default()
            })
        }
    }

    #[test]
    fn every_key_is_found_and_every_range_scanned_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("views.blocks");
        let mut keys: Vec<(Vec<u8>, ViewKey)> = (0..5_000u64)
            .flat_map(|i| {
                [
                    ViewKey::Item(format!("i{i}").into()),
                    ViewKey::Device(format!("d{i}").into()),
                ]
            })
            .map(|k| (k.encode(), k))
            .collect();
        keys.sort();
        let values: Vec<Partial> = (0..keys.len() as u64).map(partial).collect();
        let entries: Vec<(Vec<u8>, &Partial)> =
            keys.iter().map(|(e, _)| e.clone()).zip(&values).collect();
        write(&path, &entries).expect("write");
        let file = VersionFile::open(&path).expect("open");
        assert_eq!(file.len(), keys.len() as u64);
        assert!(file.blocks.len() > 10, "{} blocks", file.blocks.len());
        for (i, (enc, _)) in keys.iter().enumerate() {
            assert_eq!(file.get(enc).expect("get").as_ref(), Some(&values[i]));
        }
        let absent = ViewKey::Item("i5000x".into()).encode();
        assert_eq!(file.get(&absent).expect("get"), None);
        assert_eq!(file.get(b"").expect("get"), None);
        // One tag's keys, from a point inside them.
        let prefix = vec![ViewKey::Item(Default::default()).tag()];
        let from = ViewKey::Item("i42".into()).encode();
        let mut got = Vec::new();
        file.scan(&prefix, Some(&from), &mut |k, p| got.push((k, p)))
            .expect("scan");
        let want: Vec<(ViewKey, Partial)> = (keys.iter().zip(&values))
            .filter(|((e, _), _)| e.starts_with(&prefix) && *e >= from)
            .map(|((_, k), p)| (k.clone(), p.clone()))
            .collect();
        assert_eq!(got, want);
        assert!(!got.is_empty());
        // A cursor gives every entry, in order, across blocks.
        let mut cursor = file.cursor();
        let mut all = Vec::new();
        while cursor.key().expect("read").is_some() {
            let (k, v) = cursor.take().expect("entry");
            all.push((k, cursor.decode(&v).expect("decode")));
        }
        let want: Vec<(Vec<u8>, Partial)> = (keys.iter().zip(&values))
            .map(|((e, _), p)| (e.clone(), p.clone()))
            .collect();
        assert_eq!(all, want);
    }

    #[test]
    fn out_of_order_entries_and_damaged_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("views.blocks");
        let p = partial(1);
        let entries = vec![(b"b".to_vec(), &p), (b"a".to_vec(), &p)];
        assert!(write(&path, &entries).is_err());
        write(&path, &[(b"a".to_vec(), &p)]).expect("write");
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).expect("damage");
        let err = VersionFile::open(&path).err().expect("refused");
        assert!(err.to_string().contains("not a version file"), "{err}");
    }
}
