//! The shard cache (`--cache-dir`): shard files delivered by the coordinator, kept under their
//! content address so that a restarted worker, or one given the same layers again, receives
//! nothing.
//!
//! For a shard whose address is `A` (see `realm_common::shard`), the folder holds:
//! - `A.gguf`: a complete shard, every tensor verified. Only a rename makes one, after every
//!   tensor of `A.partial` has passed its SHA-256 check, so a shard file is never partial.
//! - `A.partial`: a shard being delivered, laid out as the final file (header written first).
//! - `A.checks`: one line per tensor of the shard that passed its SHA-256 check, with its XXH3
//!   checksum: what a resumed delivery skips, and what the fast check of a cached shard compares.
//!
//! Every time a shard is taken from the cache, but for the assignment right after the delivery
//! that checked it, its tensors are read and checked against `A.checks` (XXH3, over 20 GB/s in
//! memory); a tensor that fails is checked against its SHA-256 in the header, and
//! dropped if that fails too: the shard goes back to partial and only the damaged tensors are
//! delivered again. A file whose header does not hash to its name is deleted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use realm_common::gguf::GgufFile;
use realm_common::model::LayerRange;
use realm_common::shard::{self, hash_spans, Manifest, ShardTensor};
use realm_common::wire::ModelIdentity;
use sha2::{Digest, Sha256};
use tonic::Status;
use tracing::{info, warn};
use xxhash_rust::xxh3::Xxh3;

const SHARD: &str = "gguf";
const PARTIAL: &str = "partial";
const CHECKS: &str = "checks";

/// Bytes of a received chunk hashed and written at a time.
const PIECE: usize = 256 << 10;

/// A tensor's XXH3-128 checksum.
type Check = u128;

/// What the cache can do for a shard assignment.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// The shard is complete and checked: load this file.
    Ready(PathBuf),
    /// These tensors (indices into the manifest) must be delivered first.
    Wanted(Vec<u32>),
    /// Nothing is known of the shard: the coordinator must send its manifest.
    NeedManifest,
}

/// Counters since the worker started.
#[derive(Debug, Default)]
pub(crate) struct CacheCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub tensors_received: AtomicU64,
    pub bytes_received: AtomicU64,
    pub tensors_damaged: AtomicU64,
    pub bytes_reused: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct ShardCache {
    dir: PathBuf,
    threads: usize,
    pub counters: CacheCounters,
    /// Shards this process has just finished, every tensor checked on the way: their first use
    /// (the assignment that follows the delivery) need not read them again.
    just_checked: Mutex<HashSet<String>>,
}

fn io_status(what: String, e: &std::io::Error) -> Status {
    if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
        Status::resource_exhausted(format!("{what}: the disk is full ({e})"))
    } else {
        Status::internal(format!("{what}: {e}"))
    }
}

impl ShardCache {
    /// Opens (creating it if needed) the cache folder `dir`; checks that it can be written.
    pub fn open(dir: &Path, threads: usize) -> anyhow::Result<Self> {
        use anyhow::Context;
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the shard cache {}", dir.display()))?;
        let probe = dir.join(".realm-write-check");
        File::create(&probe)
            .and_then(|_| fs::remove_file(&probe))
            .with_context(|| format!("cannot write in the shard cache {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            threads: threads.max(1),
            counters: CacheCounters::default(),
            just_checked: Mutex::new(HashSet::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, address: &str, kind: &str) -> PathBuf {
        self.dir.join(format!("{address}.{kind}"))
    }

    /// Bytes of the complete shards in the cache.
    pub fn cached_bytes(&self) -> u64 {
        self.shard_files()
            .iter()
            .filter_map(|p| p.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    fn shard_files(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == SHARD))
            .collect()
    }

    /// Looks for a complete shard of `range` of the model `identity`, knowing nothing else of
    /// it. Blocking.
    pub fn find(&self, identity: &ModelIdentity, range: LayerRange) -> Result<Lookup, Status> {
        for path in self.shard_files() {
            // Only files named by an address are the cache's: anything else is left alone.
            let Some(address) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(str::to_string)
            else {
                continue;
            };
            let Ok(file) = GgufFile::open_without_vocabulary(&path) else {
                self.discard(&address, "it cannot be read as a GGUF file");
                continue;
            };
            match shard::source_of(&file.metadata) {
                Ok(Some((id, r))) if id.same_model(identity) && r == range => {}
                _ => continue,
            }
            let Ok(manifest) = Manifest::parse(file.header_bytes().to_vec()) else {
                self.discard(&address, "its header is not a shard manifest");
                continue;
            };
            if manifest.address() != address {
                self.discard(&address, "its header does not hash to its name");
                continue;
            }
            return self.check_complete(&manifest);
        }
        Ok(Lookup::NeedManifest)
    }

    /// What is needed before the shard of `manifest` can load: nothing (its file), or tensors;
    /// sets up a partial file for a shard never seen. Blocking.
    pub fn prepare(&self, manifest: &Manifest) -> Result<Lookup, Status> {
        let address = manifest.address();
        if self.path(address, SHARD).exists() {
            return self.check_complete(manifest);
        }
        let partial = self.path(address, PARTIAL);
        let usable = partial
            .metadata()
            .is_ok_and(|m| m.len() == manifest.file_len())
            && read_header(&partial).is_ok_and(|h| h == manifest.header());
        if !usable {
            self.create_partial(manifest)?;
        }
        let good = self.checked_tensors(manifest, &partial, false)?;
        let wanted: Vec<u32> = (0..manifest.tensors().len() as u32)
            .filter(|i| !good.contains_key(&(*i as usize)))
            .collect();
        let wanted = self.copy_from_other_shards(manifest, wanted)?;
        if wanted.is_empty() {
            // Delivered in full, but not finished (the worker stopped before the rename).
            self.finish(manifest)?;
            return Ok(Lookup::Ready(self.path(address, SHARD)));
        }
        Ok(Lookup::Wanted(wanted))
    }

    /// Copies into the partial file of `manifest` the `wanted` tensors that another complete
    /// shard of the same model in the cache holds (same SHA-256): a worker given more layers
    /// after a re-plan receives only those it lacks. Each copy is checked as a delivery is.
    /// Returns the tensors still wanted.
    fn copy_from_other_shards(
        &self,
        manifest: &Manifest,
        wanted: Vec<u32>,
    ) -> Result<Vec<u32>, Status> {
        let mut sources: HashMap<[u8; 32], (PathBuf, u64)> = HashMap::new();
        for path in self.shard_files() {
            if path.file_stem().is_some_and(|s| s == manifest.address()) {
                continue;
            }
            let Ok(other) = read_header(&path)
                .and_then(|h| Manifest::parse(h).map_err(|e| Status::internal(e.to_string())))
            else {
                continue;
            };
            if other.identity().same_model(manifest.identity()) {
                for t in other.tensors() {
                    sources.insert(t.sha256, (path.clone(), t.offset));
                }
            }
        }
        if sources.is_empty() {
            return Ok(wanted);
        }
        let partial = self.path(manifest.address(), PARTIAL);
        let what =
            |e: std::io::Error| io_status(format!("cannot copy into {}", partial.display()), &e);
        let out = OpenOptions::new()
            .write(true)
            .open(&partial)
            .map_err(what)?;
        let mut checks = OpenOptions::new()
            .append(true)
            .open(self.path(manifest.address(), CHECKS))
            .map_err(what)?;
        let mut buffer = vec![0u8; shard::READ_CHUNK];
        let mut still = Vec::new();
        let mut copied = 0u64;
        for i in wanted {
            let t = &manifest.tensors()[i as usize];
            let Some((source, offset)) = sources.get(&t.sha256) else {
                still.push(i);
                continue;
            };
            let Ok(input) = File::open(source) else {
                still.push(i);
                continue;
            };
            let (mut sha, mut check) = (Sha256::new(), Xxh3::new());
            let mut done = 0u64;
            while done < t.size {
                let n = (t.size - done).min(buffer.len() as u64) as usize;
                if input
                    .read_exact_at(&mut buffer[..n], offset + done)
                    .is_err()
                {
                    break;
                }
                out.write_all_at(&buffer[..n], t.offset + done)
                    .map_err(what)?;
                sha.update(&buffer[..n]);
                check.update(&buffer[..n]);
                done += n as u64;
            }
            let digest: [u8; 32] = sha.finalize().into();
            if done < t.size || digest != t.sha256 {
                // The other shard is damaged there: its own next use will find it.
                still.push(i);
                continue;
            }
            writeln!(checks, "{i} {:032x}", check.digest128()).map_err(what)?;
            copied += t.size;
        }
        if copied > 0 {
            self.counters
                .bytes_reused
                .fetch_add(copied, Ordering::Relaxed);
            info!(
                layers = %manifest.range(),
                bytes = copied,
                still_wanted = still.len(),
                "tensors taken from other shards in the cache"
            );
        }
        Ok(still)
    }

    /// Checks a complete shard's tensors; one that fails goes back to partial, with its damaged
    /// tensors wanted.
    fn check_complete(&self, manifest: &Manifest) -> Result<Lookup, Status> {
        let address = manifest.address();
        let path = self.path(address, SHARD);
        let len_ok = path
            .metadata()
            .is_ok_and(|m| m.len() == manifest.file_len());
        let just_checked = self
            .just_checked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(address);
        if len_ok && just_checked {
            return Ok(Lookup::Ready(path));
        }
        let good = if len_ok {
            self.checked_tensors(manifest, &path, true)?
        } else {
            BTreeMap::new()
        };
        let damaged: Vec<u32> = (0..manifest.tensors().len() as u32)
            .filter(|i| !good.contains_key(&(*i as usize)))
            .collect();
        if damaged.is_empty() {
            // Tensors that passed by their SHA-256 get their checksums back for next time.
            if self.read_checks(manifest).len() != good.len() {
                self.write_checks(manifest, &good)?;
            }
            return Ok(Lookup::Ready(path));
        }
        self.counters
            .tensors_damaged
            .fetch_add(damaged.len() as u64, Ordering::Relaxed);
        warn!(
            shard = %address,
            damaged = damaged.len(),
            first = %manifest.tensors()[damaged[0] as usize].name,
            "cached shard damaged: its damaged tensors will be delivered again"
        );
        let partial = self.path(address, PARTIAL);
        fs::rename(&path, &partial)
            .map_err(|e| io_status(format!("cannot rename {}", path.display()), &e))?;
        if !len_ok {
            self.create_partial(manifest)?;
        }
        self.write_checks(manifest, &good)?;
        Ok(Lookup::Wanted(damaged))
    }

    /// The tensors of the shard file at `path` that pass their check, with their checksums:
    /// those listed in the checks file whose bytes still give the listed XXH3. In a `complete`
    /// file, where every tensor passed once, any other tensor passes if its SHA-256 equals the
    /// manifest's (the checks file may be lost or damaged); in a partial one it was never
    /// delivered.
    fn checked_tensors(
        &self,
        manifest: &Manifest,
        path: &Path,
        complete: bool,
    ) -> Result<BTreeMap<usize, Check>, Status> {
        let listed = self.read_checks(manifest);
        let tensors = manifest.tensors();
        let span = |i: usize| (tensors[i].offset, tensors[i].size);
        let failed = |e: realm_common::Error| {
            Status::internal(format!("cannot check the cached shard: {e}"))
        };
        let candidates: Vec<usize> = if complete {
            (0..tensors.len()).collect()
        } else {
            listed.keys().copied().collect()
        };
        let spans: Vec<(u64, u64)> = candidates.iter().map(|&i| span(i)).collect();
        let checks = hash_spans(
            path,
            &spans,
            self.threads,
            Xxh3::new,
            |h, b| h.update(b),
            |h| h.digest128(),
        )
        .map_err(failed)?;
        type Checked = Vec<(usize, Check)>;
        let (mut good, unlisted): (Checked, Checked) = candidates
            .into_iter()
            .zip(checks)
            .partition(|(i, check)| listed.get(i) == Some(check));
        if complete && !unlisted.is_empty() {
            let spans: Vec<(u64, u64)> = unlisted.iter().map(|&(i, _)| span(i)).collect();
            let digests = hash_spans(
                path,
                &spans,
                self.threads,
                Sha256::new,
                |h, b| h.update(b),
                |h| -> [u8; 32] { h.finalize().into() },
            )
            .map_err(failed)?;
            good.extend(
                unlisted
                    .into_iter()
                    .zip(digests)
                    .filter(|((i, _), digest)| *digest == tensors[*i].sha256)
                    .map(|(entry, _)| entry),
            );
        }
        Ok(good.into_iter().collect())
    }

    fn read_checks(&self, manifest: &Manifest) -> BTreeMap<usize, Check> {
        let text = fs::read_to_string(self.path(manifest.address(), CHECKS)).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let (index, check) = line.split_once(' ')?;
                Some((index.parse().ok()?, Check::from_str_radix(check, 16).ok()?))
            })
            .filter(|(i, _)| *i < manifest.tensors().len())
            .collect()
    }

    fn write_checks(
        &self,
        manifest: &Manifest,
        good: &BTreeMap<usize, Check>,
    ) -> Result<(), Status> {
        let path = self.path(manifest.address(), CHECKS);
        let text: String = good
            .iter()
            .map(|(i, c)| format!("{i} {c:032x}\n"))
            .collect();
        fs::write(&path, text)
            .map_err(|e| io_status(format!("cannot write {}", path.display()), &e))
    }

    /// Creates the partial file of `manifest`, its space reserved and its header written, with
    /// no tensor checked yet.
    fn create_partial(&self, manifest: &Manifest) -> Result<(), Status> {
        let address = manifest.address();
        let path = self.path(address, PARTIAL);
        let needed = manifest.file_len();
        if let Ok(stat) = rustix::fs::statvfs(&self.dir) {
            let free = stat.f_bavail.saturating_mul(stat.f_frsize);
            if free < needed {
                return Err(Status::resource_exhausted(format!(
                    "the shard cache {} has {} MiB free; layers {} need {} MiB: free some space or \
                     give another --cache-dir",
                    self.dir.display(),
                    free >> 20,
                    manifest.range(),
                    needed.div_ceil(1 << 20)
                )));
            }
        }
        let _ = fs::remove_file(self.path(address, CHECKS));
        let what = || format!("cannot create {}", path.display());
        let file = File::create(&path).map_err(|e| io_status(what(), &e))?;
        // Reserving the space now makes a full disk fail here, not half-way.
        match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, needed) {
            Ok(()) => {}
            Err(rustix::io::Errno::OPNOTSUPP) => {
                file.set_len(needed).map_err(|e| io_status(what(), &e))?
            }
            Err(e) => {
                drop(file);
                let _ = fs::remove_file(&path);
                return Err(io_status(what(), &e.into()));
            }
        }
        file.write_all_at(manifest.header(), 0)
            .map_err(|e| io_status(what(), &e))?;
        fs::write(self.path(address, CHECKS), "").map_err(|e| io_status(what(), &e))?;
        Ok(())
    }

    /// Turns a partial file whose every tensor has just passed its check into the shard file.
    ///
    /// The data is not forced to disk first (that would cost a disk write of the whole shard on
    /// the path of an assignment): every later use of a cached shard checks its tensors, so one
    /// that a crash left short is found and its tensors delivered again.
    fn finish(&self, manifest: &Manifest) -> Result<(), Status> {
        let partial = self.path(manifest.address(), PARTIAL);
        let shard = self.path(manifest.address(), SHARD);
        fs::rename(&partial, &shard)
            .map_err(|e| io_status(format!("cannot finish {}", shard.display()), &e))?;
        self.just_checked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(manifest.address().to_string());
        info!(shard = %manifest.address(), layers = %manifest.range(), bytes = manifest.file_len(), "shard cached");
        Ok(())
    }

    /// Deletes the files of the shard at `address`.
    fn discard(&self, address: &str, why: &str) {
        warn!(shard = %address, why, "discarding a damaged shard file");
        for kind in [SHARD, PARTIAL, CHECKS] {
            let _ = fs::remove_file(self.path(address, kind));
        }
    }

    /// Starts receiving the tensors of the shard of `manifest` the cache lacks.
    pub fn receiver(self: &Arc<Self>, manifest: Arc<Manifest>) -> Result<Receiver, Status> {
        let mut receiver = Receiver {
            cache: Arc::clone(self),
            done: BTreeMap::new(),
            file: None,
            checks: None,
            current: None,
            tensors: 0,
            bytes: 0,
            manifest,
        };
        let manifest = Arc::clone(&receiver.manifest);
        if let Lookup::Ready(_) = self.prepare(&manifest)? {
            receiver.done = (0..manifest.tensors().len()).map(|i| (i, 0)).collect();
            return Ok(receiver);
        }
        let path = self.path(manifest.address(), PARTIAL);
        receiver.file = Some(
            OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| io_status(format!("cannot open {}", path.display()), &e))?,
        );
        receiver.checks = Some(
            OpenOptions::new()
                .append(true)
                .open(self.path(manifest.address(), CHECKS))
                .map_err(|e| io_status("cannot open the checks file".to_string(), &e))?,
        );
        receiver.done = self.read_checks(&manifest);
        Ok(receiver)
    }
}

/// The header of the GGUF file at `path`, padded to its alignment.
fn read_header(path: &Path) -> Result<Vec<u8>, Status> {
    GgufFile::open_without_vocabulary(path)
        .map(|file| file.header_bytes().to_vec())
        .map_err(|e| Status::internal(format!("cannot read {}: {e}", path.display())))
}

/// The tensor being received.
struct InFlight {
    index: usize,
    received: u64,
    sha: Sha256,
    check: Xxh3,
}

/// Writes one delivery's tensors into a partial shard file, checking each as it completes.
pub(crate) struct Receiver {
    cache: Arc<ShardCache>,
    manifest: Arc<Manifest>,
    file: Option<File>,
    checks: Option<File>,
    /// Tensors checked, by this delivery or an earlier one.
    done: BTreeMap<usize, Check>,
    current: Option<InFlight>,
    /// Tensors and bytes checked by this delivery.
    pub tensors: u32,
    pub bytes: u64,
}

impl Receiver {
    /// Bytes of the tensors still to receive.
    pub fn remaining_bytes(&self) -> u64 {
        let tensors = self.manifest.tensors().iter().enumerate();
        tensors
            .filter(|(i, _)| !self.done.contains_key(i))
            .map(|(_, t)| t.size)
            .sum()
    }

    /// Writes one chunk; checks its tensor if the chunk completes it.
    pub fn chunk(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Status> {
        let index = index as usize;
        let tensor: &ShardTensor = self.manifest.tensors().get(index).ok_or_else(|| {
            Status::invalid_argument(format!(
                "tensor {index} is not in the shard ({} tensors)",
                self.manifest.tensors().len()
            ))
        })?;
        if self.current.as_ref().is_some_and(|c| c.index != index) {
            return Err(self.cut_short());
        }
        if self.current.is_none() {
            if offset != 0 {
                return Err(Status::invalid_argument(format!(
                    "tensor `{}` starts at offset {offset}: a tensor is sent whole, from 0",
                    tensor.name
                )));
            }
            if self.done.contains_key(&index) {
                return Err(Status::invalid_argument(format!(
                    "tensor `{}` was already delivered and checked",
                    tensor.name
                )));
            }
            self.current = Some(InFlight {
                index,
                received: 0,
                sha: Sha256::new(),
                check: Xxh3::new(),
            });
        }
        let (Some(file), Some(current)) = (&self.file, &mut self.current) else {
            return Err(Status::invalid_argument(format!(
                "tensor `{}` was sent, but the shard is complete already",
                tensor.name
            )));
        };
        if offset != current.received || data.len() as u64 > tensor.size - current.received {
            return Err(Status::invalid_argument(format!(
                "chunk of {} bytes at offset {offset} of tensor `{}` ({} bytes, {} received): \
                 chunks come in order and stay inside their tensor",
                data.len(),
                tensor.name,
                tensor.size,
                current.received
            )));
        }
        // In pieces that stay in the core's cache between the hashing and the write.
        for (i, piece) in data.chunks(PIECE).enumerate() {
            file.write_all_at(piece, tensor.offset + offset + (i * PIECE) as u64)
                .map_err(|e| {
                    io_status(
                        format!("cannot write the shard cache {}", self.cache.dir.display()),
                        &e,
                    )
                })?;
            current.sha.update(piece);
            current.check.update(piece);
        }
        current.received += data.len() as u64;
        if current.received < tensor.size {
            return Ok(());
        }
        let Some(current) = self.current.take() else {
            return Ok(());
        };
        let digest: [u8; 32] = current.sha.finalize().into();
        if digest != tensor.sha256 {
            return Err(Status::data_loss(format!(
                "tensor `{}` arrived damaged: its SHA-256 is {}, the manifest says {}; it was \
                 not kept",
                tensor.name,
                shard::hex(&digest),
                shard::hex(&tensor.sha256)
            )));
        }
        let check = current.check.digest128();
        if let Some(checks) = &mut self.checks {
            writeln!(checks, "{index} {check:032x}")
                .map_err(|e| io_status("cannot write the checks file".to_string(), &e))?;
        }
        self.done.insert(index, check);
        self.tensors += 1;
        self.bytes += tensor.size;
        let counters = &self.cache.counters;
        counters.tensors_received.fetch_add(1, Ordering::Relaxed);
        counters
            .bytes_received
            .fetch_add(tensor.size, Ordering::Relaxed);
        Ok(())
    }

    fn cut_short(&self) -> Status {
        let name = self
            .current
            .as_ref()
            .map(|c| self.manifest.tensors()[c.index].name.as_str())
            .unwrap_or_default();
        Status::invalid_argument(format!(
            "the delivery of tensor `{name}` stopped before its last byte; it was not kept"
        ))
    }

    /// Ends the delivery: the shard file is made once every tensor has passed. Whether it was.
    pub fn finish(self) -> Result<bool, Status> {
        if self.current.is_some() {
            return Err(self.cut_short());
        }
        if self.done.len() < self.manifest.tensors().len() {
            return Ok(false);
        }
        if self.file.is_some() {
            self.cache.finish(&self.manifest)?;
        }
        Ok(true)
    }
}
