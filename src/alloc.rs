//! The daemon's allocator: mimalloc for everything a request touches (it is what keeps
//! ingest fast: +25 % over glibc's malloc here), and the system allocator for the rare large
//! blocks (256 KiB and up). Large blocks are mostly zeroed tables allocated once (sled's
//! metrics histograms, its page table, the log buffers); the system allocator maps them
//! fresh from the OS, so the pages nobody writes stay unbacked, where mimalloc writes the
//! zeros and keeps them resident (measured idle: 39 MB resident with mimalloc alone, 14 MB
//! with this split).
//!
//! Which allocator owns a block follows from its size alone, which `dealloc` and `realloc`
//! are given, so no bookkeeping is needed.

use std::alloc::{GlobalAlloc, Layout, System};

/// Makes the system allocator map every large block fresh from the OS and unmap it when it is
/// freed, as this module relies on. Call once, first thing in `main`.
///
/// glibc's default is a *dynamic* threshold: once a mapped block is freed, blocks up to that
/// size come from its per-thread heaps instead, which keep what they once held (measured in
/// the soak: resident memory 70 -> 240 MB within minutes of retention's first log file drop,
/// as unpacked file indexes and sled's large buffers went through the heaps; about 100 MB and
/// flat with the threshold fixed). Setting it fixes it at [`LARGE`].
pub fn init() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation parameters; it takes no pointers, and is
    // called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE as libc::c_int);
    }
}

/// Blocks of at least this many bytes come from the system allocator.
pub const LARGE: usize = 256 * 1024;

pub struct Allocator;

static SMALL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn large(layout: &Layout) -> bool {
    layout.size() >= LARGE
}

// SAFETY: every block is freed (and resized) by the allocator that made it: the choice
// depends only on the layout's size, which the caller passes back unchanged (and `realloc`
// moves a block across the threshold by allocating in the other allocator, copying and
// freeing the old one).
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if large(&layout) {
            System.alloc(layout)
        } else {
            SMALL.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if large(&layout) {
            System.alloc_zeroed(layout)
        } else {
            SMALL.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if large(&layout) {
            System.dealloc(ptr, layout)
        } else {
            SMALL.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let was_large = large(&layout);
        let is_large = new_size >= LARGE;
        match (was_large, is_large) {
            (true, true) => System.realloc(ptr, layout, new_size),
            (false, false) => SMALL.realloc(ptr, layout, new_size),
            _ => {
                let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
                    return std::ptr::null_mut();
                };
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether glibc mapped the block on its own: a mapping of the process then starts at its
    /// chunk header, 16 bytes before it.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn mapped(p: *mut u8) -> bool {
        let start = format!("{:x}-", p as usize - 16);
        std::fs::read_to_string("/proc/self/maps")
            .expect("maps")
            .lines()
            .any(|l| l.starts_with(&start))
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn large_blocks_stay_mapped_after_a_larger_one_is_freed() {
        init();
        let a = Allocator;
        unsafe {
            // With glibc's dynamic threshold, freeing this raises the threshold to 8 MiB ...
            let huge = Layout::from_size_align(8 << 20, 8).unwrap();
            let p = a.alloc(huge);
            assert!(mapped(p));
            a.dealloc(p, huge);
            // ... and this would then come from a heap that keeps its pages.
            let big = Layout::from_size_align(LARGE * 2, 8).unwrap();
            let q = a.alloc(big);
            assert!(
                mapped(q),
                "a large block was not mapped: the threshold moved"
            );
            a.dealloc(q, big);
        }
    }

    #[test]
    fn blocks_move_across_the_threshold_intact() {
        let a = Allocator;
        unsafe {
            let small = Layout::from_size_align(1024, 8).unwrap();
            let p = a.alloc(small);
            assert!(!p.is_null());
            for i in 0..1024 {
                *p.add(i) = (i % 251) as u8;
            }
            // Up into the system allocator, then back down into mimalloc.
            let p = a.realloc(p, small, LARGE * 2);
            assert!(!p.is_null());
            assert!((0..1024).all(|i| *p.add(i) == (i % 251) as u8));
            let big = Layout::from_size_align(LARGE * 2, 8).unwrap();
            *p.add(LARGE * 2 - 1) = 7;
            let p = a.realloc(p, big, 512);
            assert!((0..512).all(|i| *p.add(i) == (i % 251) as u8));
            a.dealloc(p, Layout::from_size_align(512, 8).unwrap());
            let z = a.alloc_zeroed(big);
            assert!((0..LARGE * 2).step_by(4096).all(|i| *z.add(i) == 0));
            a.dealloc(z, big);
        }
    }
}
