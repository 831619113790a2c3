//! The one place where Realm maps files into memory. Everything else sees a read-only `&[u8]`.

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};

/// A read-only memory map of a whole file.
#[derive(Debug)]
pub struct MappedFile {
    map: memmap2::Mmap,
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
        Ok(Self { map })
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

/// `len` zeroed bytes of anonymous memory, which the OS is asked to back with huge pages
/// (`MADV_HUGEPAGE`) where it can: weights streamed once per step then cost one TLB entry per
/// 2 MiB instead of per 4 KiB. Without huge pages it is ordinary memory.
pub fn huge_page_buffer(len: usize) -> std::io::Result<memmap2::MmapMut> {
    let map = memmap2::MmapMut::map_anon(len)?;
    #[cfg(target_os = "linux")]
    // Only a hint: kernels without transparent huge pages refuse it, and the memory still works.
    let _ = map.advise(memmap2::Advice::HugePage);
    Ok(map)
}
