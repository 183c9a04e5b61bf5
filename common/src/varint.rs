//! LEB128 varints (7 bits a byte, low first, the high bit set on all but the last) and zigzag
//! for signed values: the compact files and held rows of the batch and serving layers.

/// Appends `v` to `out`.
pub fn put(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads the varint at `*at` and moves `*at` past it; `None` past the end or past 128 bits.
#[inline]
pub fn take(bytes: &[u8], at: &mut usize) -> Option<u128> {
    let b = *bytes.get(*at)?;
    *at += 1;
    if b < 0x80 {
        // Most values (counts, steps between numbers) take one byte.
        return Some(u128::from(b));
    }
    let mut v = u128::from(b & 0x7f);
    let mut shift = 7;
    loop {
        let b = *bytes.get(*at)?;
        *at += 1;
        if shift > 126 {
            return None;
        }
        v |= u128::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
        shift += 7;
    }
}

/// A signed value as an unsigned one, small magnitudes small.
#[inline]
pub fn zigzag(v: i128) -> u128 {
    ((v << 1) ^ (v >> 127)) as u128
}

/// The inverse of [`zigzag`].
#[inline]
pub fn unzigzag(v: u128) -> i128 {
    ((v >> 1) as i128) ^ -((v & 1) as i128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back_as_written_and_a_cut_one_is_none() {
        let values = [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u128::from(u32::MAX),
            u128::MAX,
        ];
        let mut out = Vec::new();
        for v in values {
            put(&mut out, v);
        }
        let mut at = 0;
        for v in values {
            assert_eq!(take(&out, &mut at), Some(v));
        }
        assert_eq!(at, out.len());
        let mut one = Vec::new();
        put(&mut one, 300);
        assert_eq!(one.len(), 2);
        assert_eq!(take(&one[..1], &mut 0), None, "cut short");
        for v in [0, -1, 1, i128::MIN, i128::MAX] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        assert_eq!(zigzag(-1), 1);
    }
}
