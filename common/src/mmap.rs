//! The one place where Realm maps files into memory. Everything else sees a read-only `&[u8]`.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{Error, Result};

/// A read-only memory map of a whole file, and the file, for reads that should map nothing.
#[derive(Debug)]
pub struct MappedFile {
    map: memmap2::Mmap,
    file: File,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and Realm never writes model files. Another process truncating
        // the file while it is mapped would fault on access; model files are treated as immutable
        // inputs (the contract every GGUF engine relies on).
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Ok(Self { map, file })
    }

    /// Fills `buf` with the file's bytes from `offset` by reading the file, not the map: none of
    /// its pages is mapped into the process (a read through the map maps up to 64 KiB around
    /// the bytes, the kernel's fault-around, which then stay resident until given back).
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> std::io::Result<()> {
        if offset
            .checked_add(buf.len())
            .is_none_or(|end| end > self.map.len())
        {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            self.file.read_exact_at(buf, offset as u64)
        }
        #[cfg(not(unix))]
        {
            buf.copy_from_slice(&self.map[offset..offset + buf.len()]);
            Ok(())
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Maps the pages of `offset..offset + len` into the process now (`MADV_POPULATE_READ`),
    /// so computing from them later takes no page faults; on kernels without that advice, reads
    /// one byte of every page instead.
    pub fn populate(&self, offset: usize, len: usize) -> std::io::Result<()> {
        let bytes = offset
            .checked_add(len)
            .and_then(|end| self.map.get(offset..end))
            .ok_or(std::io::ErrorKind::InvalidInput)?;
        #[cfg(target_os = "linux")]
        if self
            .map
            .advise_range(memmap2::Advice::PopulateRead, offset, len)
            .is_ok()
        {
            return Ok(());
        }
        const PAGE: usize = 4096;
        let touched = bytes.iter().step_by(PAGE).fold(0u8, |acc, b| acc ^ b);
        std::hint::black_box(touched);
        Ok(())
    }

    /// Gives the pages of `offset..offset + len` back to the OS (`madvise(MADV_DONTNEED)`), so
    /// they stop counting in the process's resident memory until read again. The start is rounded
    /// down to a page boundary, so a page shared with a neighbouring range is dropped too; the
    /// next read of it faults it back in from the page cache, unchanged.
    pub fn release(&self, offset: usize, len: usize) -> std::io::Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.map.len())
        {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: the map is private and read-only, never written: MADV_DONTNEED only drops the
        // page table entries, and the next read refills them with the same file bytes. Slices
        // borrowed from the map elsewhere stay valid and keep reading the same contents.
        #[allow(unsafe_code)]
        unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
        }
    }
}

/// Where the copies of weights (repacked matrices) live: packed one after another, each from a
/// page boundary, into regions of anonymous memory whose 2 MiB-aligned ranges the OS is asked
/// to back with huge pages (`MADV_HUGEPAGE`). A decode step streams every weight once, so a
/// matrix on 4 KiB pages costs a TLB miss, and a restart of the hardware prefetcher, every
/// 4 KiB; a small matrix in a mapping of its own never gets a huge page (none fits in it),
/// while consecutive matrices in one region do. Timed in place right after load, a decode
/// step's layer took 98–101 µs instead of 117–132 on SmolLM2, 162–193 instead of 217–229 on
/// gemma3.
///
/// A region is reserved [`REGION`] bytes at a time, address space only until written (a
/// request of over a quarter of that gets a region of its own). The bytes of a matrix go back
/// to the OS when the matrix is dropped (a layer evicted by the layer manager), the region's
/// mapping when its last matrix is.
const REGION: usize = 64 << 20;

/// A huge page, the alignment a region's first byte gets.
const HUGE_PAGE: usize = 2 << 20;

/// A base page: each matrix starts on one, so that releasing it never drops a neighbour's page.
const PAGE: usize = 4096;

/// One mapping of the weight arena.
#[derive(Debug)]
struct Region {
    map: memmap2::MmapRaw,
}

impl Region {
    /// A mapping with `len` bytes from a huge-page boundary (the start of its first whole huge
    /// page, returned with it), asked to be backed with huge pages over its first `huge` bytes
    /// (rounded down to whole huge pages): a huge page over a range's end would hold memory that
    /// no weight uses.
    fn reserve(len: usize, huge: usize) -> std::io::Result<(Self, usize)> {
        let map: memmap2::MmapRaw = memmap2::MmapMut::map_anon(len + HUGE_PAGE)?.into();
        let start = (map.as_ptr() as usize).next_multiple_of(HUGE_PAGE) - map.as_ptr() as usize;
        // Only a hint: kernels without transparent huge pages refuse it, and the memory works.
        #[cfg(target_os = "linux")]
        if huge >= HUGE_PAGE {
            let whole = huge / HUGE_PAGE * HUGE_PAGE;
            let _ = map.advise_range(memmap2::Advice::HugePage, start, whole);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = huge;
        Ok((Self { map }, start))
    }
}

/// Regions handed out range by range: the region being filled and the offset of its free space.
#[derive(Debug, Default)]
struct Arena {
    filling: Mutex<Option<(Arc<Region>, usize)>>,
}

/// The process's weight arena.
static WEIGHTS: Arena = Arena {
    filling: Mutex::new(None),
};

impl Arena {
    /// `len` bytes, zeroed, then written by `fill`.
    fn bytes(&self, len: usize, fill: impl FnOnce(&mut [u8])) -> std::io::Result<WeightBytes> {
        let span = len.max(1).next_multiple_of(PAGE);
        let (region, offset) = if span > REGION / 4 {
            let (region, start) = Region::reserve(span, len)?;
            (Arc::new(region), start)
        } else {
            let mut filling = self.filling.lock().unwrap_or_else(PoisonError::into_inner);
            let room = filling
                .as_ref()
                .is_some_and(|(region, next)| next + span <= region.map.len());
            if !room {
                let (region, start) = Region::reserve(REGION, REGION)?;
                *filling = Some((Arc::new(region), start));
            }
            let Some((region, next)) = filling.as_mut() else {
                unreachable!("a region was just put in place");
            };
            let offset = *next;
            *next += span;
            (Arc::clone(region), offset)
        };
        // SAFETY: `offset..offset + len` lies within the mapping, which `region` keeps alive,
        // and no other `WeightBytes` covers it: the free space's offset only grows, under the
        // lock, and a region of its own is this range's alone. The slice is the only reference
        // to these bytes until `fill` returns.
        #[allow(unsafe_code)]
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(region.map.as_mut_ptr().add(offset), len) };
        fill(bytes);
        Ok(WeightBytes {
            region,
            offset,
            len,
        })
    }
}

/// A copy of weights in the weight arena (see [`REGION`]): written once, when made, and
/// read-only after.
pub struct WeightBytes {
    region: Arc<Region>,
    offset: usize,
    len: usize,
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightBytes")
            .field("len", &self.len)
            .finish()
    }
}

impl WeightBytes {
    /// `len` bytes of the weight arena, zeroed, then written by `fill`.
    pub fn new(len: usize, fill: impl FnOnce(&mut [u8])) -> std::io::Result<Self> {
        WEIGHTS.bytes(len, fill)
    }
}

impl std::ops::Deref for WeightBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the range lies within the mapping, which `self.region` keeps alive; it was
        // written before `self` was made and is never written again.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.region.map.as_ptr().add(self.offset), self.len)
        }
    }
}

impl Drop for WeightBytes {
    fn drop(&mut self) {
        // A region's last range goes with its mapping; any other gives its pages back now.
        if Arc::strong_count(&self.region) > 1 {
            // SAFETY: these pages are this range's alone (each range starts on a page and no
            // other covers them) and nothing reads them any more: `self` is going, and with it
            // the only slices of them. The next touch of a released page would read zeros,
            // and none comes: the arena never hands a range out twice.
            #[allow(unsafe_code)]
            let _ = unsafe {
                self.region.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    self.offset,
                    self.len.max(1).next_multiple_of(PAGE),
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(Rss, AnonHugePages)` in KiB of the mapping of this process that holds `at`, from
    /// `/proc/self/smaps`; `None` where there is no such file or mapping.
    fn mapping_kib(at: usize) -> Option<(u64, u64)> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        let (mut rss, mut huge) = (None, None);
        for line in smaps.lines() {
            let range = line.split(' ').next().and_then(|r| r.split_once('-'));
            let bounds = range.and_then(|(a, b)| {
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            });
            if let Some((start, end)) = bounds {
                if inside {
                    break;
                }
                inside = (start..end).contains(&at);
                continue;
            }
            let kib = |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse().ok());
            if inside && line.starts_with("Rss:") {
                rss = kib(line);
            }
            if inside && line.starts_with("AnonHugePages:") {
                huge = kib(line);
            }
        }
        Some((rss?, huge.unwrap_or(0)))
    }

    #[test]
    fn weights_keep_their_bytes_apart_and_give_pages_back_when_dropped() {
        // An arena of this test's own, so that no other test's weights share its region.
        let arena = Arena::default();
        let pattern = |seed: u8, len: usize| -> Vec<u8> {
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect()
        };
        let lens = [100, PAGE, 3 * PAGE + 5, 200_000, 70_000];
        let mut made: Vec<WeightBytes> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                arena
                    .bytes(len, |b| {
                        assert!(b.iter().all(|&x| x == 0), "fresh bytes are zeros");
                        b.copy_from_slice(&pattern(i as u8, len));
                    })
                    .expect("arena memory")
            })
            .collect();
        for w in &made {
            assert_eq!(w.as_ptr() as usize % PAGE, 0, "each copy starts on a page");
        }
        let at = made[0].as_ptr() as usize;
        assert_eq!(at % HUGE_PAGE, 0, "a region starts on a huge page");
        // Dropping one gives its pages back and leaves its neighbours' bytes as written.
        let before = mapping_kib(at);
        made.remove(3);
        if let (Some((before, _)), Some((after, _))) = (before, mapping_kib(at)) {
            assert!(
                before - after >= 196,
                "{before} KiB resident, then {after} KiB"
            );
        }
        for (w, i) in made.iter().zip([0, 1, 2, 4]) {
            assert_eq!(&w[..], &pattern(i, lens[i as usize])[..], "copy {i}");
        }
        // The region goes with its last copy.
        let region = Arc::downgrade(&made[0].region);
        drop(made);
        drop(arena);
        assert!(region.upgrade().is_none(), "the region is unmapped");
    }

    #[test]
    fn a_large_copy_has_a_mapping_of_its_own_on_huge_pages() {
        let len = REGION / 4 + 3 * HUGE_PAGE + 12345;
        let w = WeightBytes::new(len, |b| b.fill(7)).expect("arena memory");
        let at = w.as_ptr() as usize;
        assert_eq!(at % HUGE_PAGE, 0, "starts on a huge page");
        assert!(w.iter().all(|&b| b == 7));
        assert_eq!(Arc::strong_count(&w.region), 1, "a mapping of its own");
        if let Some((rss, huge)) = mapping_kib(at) {
            // The huge-page advice splits the mapping: the one at `at` holds the whole huge
            // pages, written, so resident.
            assert_eq!(rss as usize * 1024, len / HUGE_PAGE * HUGE_PAGE);
            // On huge pages where the kernel offers them to mappings that ask; they may still
            // be refused when memory is fragmented, so their share is reported, not required.
            eprintln!("{huge} KiB of {rss} KiB on huge pages");
        }
        let region = Arc::downgrade(&w.region);
        drop(w);
        assert!(region.upgrade().is_none(), "the mapping goes with its copy");
    }
}
