//! Names of directory entries in one machine word: the inode table keeps one per object the
//! kernel knows (200k and more on a build cache), so a name costs 8 bytes inline, nothing more
//! when it is short (up to 7 bytes: `lib`, `src`, `mod.rs`, `LICENSE`), and one exact-size
//! allocation (a 4-byte length, then the bytes) otherwise.

use std::alloc::{alloc, dealloc, Layout};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::ptr::NonNull;

const W: usize = std::mem::size_of::<usize>();
/// Longest name kept inline.
const INLINE: usize = W - 1;
/// The byte of the word that holds the address's low bits: the tag (bit 0 set: inline) and the
/// inline length (bits 1..).
const TAG: usize = if cfg!(target_endian = "little") {
    0
} else {
    W - 1
};
/// Where inline bytes start.
const DATA: usize = if cfg!(target_endian = "little") { 1 } else { 0 };
/// Heap names start with their length.
const HDR: usize = 4;

/// An immutable name (bytes of an `OsStr`), one word wide.
pub struct Name(NonNull<u8>);

// SAFETY: a Name owns its bytes exclusively and never mutates them.
unsafe impl Send for Name {}
// SAFETY: as above: shared access only reads.
unsafe impl Sync for Name {}

/// Layout of a heap name of `len` bytes (align 2: the address's bit 0 stays free for the tag).
fn layout(len: usize) -> Layout {
    Layout::from_size_align(HDR + len, 2).unwrap_or(Layout::new::<u16>())
}

impl Name {
    /// A name holding `b`.
    pub fn new(b: &[u8]) -> Name {
        if b.len() <= INLINE {
            let mut raw = [0u8; W];
            raw[TAG] = ((b.len() as u8) << 1) | 1;
            raw[DATA..DATA + b.len()].copy_from_slice(b);
            let word = usize::from_ne_bytes(raw);
            // Never null: the tag bit is set.
            return Name(
                NonNull::new(std::ptr::without_provenance_mut(word)).unwrap_or(NonNull::dangling()),
            );
        }
        // Names come from the kernel or a directory listing (at most NAME_MAX bytes); a longer
        // one is cut at 4 GiB rather than wrap.
        let b = &b[..b.len().min(u32::MAX as usize)];
        let l = layout(b.len());
        // SAFETY: `l` has a non-zero size.
        let p = unsafe { alloc(l) };
        let Some(p) = NonNull::new(p) else {
            std::alloc::handle_alloc_error(l)
        };
        // SAFETY: `p` points at HDR + len writable bytes.
        unsafe {
            std::ptr::copy_nonoverlapping((b.len() as u32).to_ne_bytes().as_ptr(), p.as_ptr(), HDR);
            std::ptr::copy_nonoverlapping(b.as_ptr(), p.as_ptr().add(HDR), b.len());
        }
        Name(p)
    }

    fn is_inline(&self) -> bool {
        self.0.as_ptr().addr() & 1 == 1
    }

    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        if self.is_inline() {
            // SAFETY: a NonNull<u8> is W initialised bytes; an inline name's are plain data.
            let raw: &[u8; W] = unsafe { &*(&self.0 as *const NonNull<u8> as *const [u8; W]) };
            let len = usize::from(raw[TAG] >> 1);
            &raw[DATA..DATA + len]
        } else {
            // SAFETY: a heap name points at its length followed by that many bytes, which live
            // as long as self.
            unsafe {
                let p = self.0.as_ptr();
                let mut len = [0u8; HDR];
                std::ptr::copy_nonoverlapping(p, len.as_mut_ptr(), HDR);
                std::slice::from_raw_parts(p.add(HDR), u32::from_ne_bytes(len) as usize)
            }
        }
    }
}

impl Drop for Name {
    fn drop(&mut self) {
        if !self.is_inline() {
            let l = layout(self.as_bytes().len());
            // SAFETY: allocated in `new` with this layout.
            unsafe { dealloc(self.0.as_ptr(), l) }
        }
    }
}

impl Clone for Name {
    fn clone(&self) -> Name {
        if self.is_inline() {
            Name(self.0)
        } else {
            Name::new(self.as_bytes())
        }
    }
}

impl std::ops::Deref for Name {
    type Target = OsStr;
    fn deref(&self) -> &OsStr {
        OsStr::from_bytes(self.as_bytes())
    }
}

impl From<&OsStr> for Name {
    fn from(s: &OsStr) -> Name {
        Name::new(s.as_bytes())
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Name {}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_length() {
        for len in 0..300 {
            let b: Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
            let n = Name::new(&b);
            assert_eq!(n.as_bytes(), &b[..], "len {len}");
            let c = n.clone();
            drop(n);
            assert_eq!(c.as_bytes(), &b[..]);
            assert_eq!(c.is_inline(), len <= INLINE);
        }
        assert_eq!(std::mem::size_of::<Option<(u64, Name)>>(), 16);
    }
}
