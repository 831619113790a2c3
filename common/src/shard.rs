//! Shard files: the tensors of one range of a model's layers, as a worker without the model file
//! keeps them in its shard cache.
//!
//! A shard file is a GGUF file the worker maps as it maps a model file, so the layer manager and
//! the kernels' zero-copy paths work on it unchanged. It holds:
//! - the model's metadata, less the tokenizer's (workers never tokenize);
//! - the tensors of the layers (`blk.{i}.*`, named as in the model) and the model-wide tensors the
//!   blocks read (RoPE frequency factors);
//! - `realm.shard.*` keys: the identity of the model it was cut from, its layer range, and the
//!   SHA-256 of every tensor, in directory order.
//!
//! The header names every tensor's digest, so its own SHA-256 names the whole file: that is the
//! shard's content address, and its [`Manifest`] is the header alone. The coordinator builds the
//! header from the model ([`ShardLayout`]); a worker checks a header it is sent
//! ([`Manifest::parse`]) before writing anything it describes.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::gguf::{encode_header, parse_header, GgufFile, TensorEntry, TensorInfo, Value};
use crate::model::config::tensors::{ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT, ROPE_FREQS};
use crate::model::LayerRange;
use crate::wire::ModelIdentity;

/// SHA-256 (hex) of the header of the model the shard was cut from.
pub const KEY_MODEL_SHA256: &str = "realm.shard.model_sha256";
/// Length in bytes of the model's file.
pub const KEY_MODEL_BYTES: &str = "realm.shard.model_bytes";
/// The layer range `[start, end)`, as two `u32`.
pub const KEY_LAYERS: &str = "realm.shard.layers";
/// SHA-256 (hex) of every tensor's bytes, in directory order.
pub const KEY_TENSOR_SHA256: &str = "realm.shard.tensor_sha256";

/// Model-wide tensors the blocks read.
const BLOCK_GLOBALS: [&str; 3] = [ROPE_FREQS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT];

/// Metadata only the tokenizer reads.
fn is_tokenizer_key(key: &str) -> bool {
    key.starts_with("tokenizer.")
}

/// A SHA-256 digest.
pub type Digest32 = [u8; 32];

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn parse_hex(text: &str) -> Option<Digest32> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The tensors a worker's blocks of `range` read, in name order: `blk.{i}.*` for every layer of
/// the range, and the model-wide RoPE factors.
pub fn shard_tensors(file: &GgufFile, range: LayerRange) -> Vec<&TensorInfo> {
    file.tensors
        .values()
        .filter(|info| match info.name.strip_prefix("blk.") {
            Some(rest) => rest
                .split_once('.')
                .and_then(|(layer, _)| layer.parse::<usize>().ok())
                .is_some_and(|layer| range.contains(layer)),
            None => BLOCK_GLOBALS.contains(&info.name.as_str()),
        })
        .collect()
}

/// The shard of a range of a model, laid out but not yet hashed: the coordinator builds one per
/// shard it delivers and completes its header with the tensors' digests.
#[derive(Debug, Clone)]
pub struct ShardLayout {
    metadata: Vec<(String, Value)>,
    /// The model's tensors of the shard, in directory order.
    tensors: Vec<TensorInfo>,
    /// Each tensor's offset in the shard's data section.
    offsets: Vec<u64>,
    alignment: u64,
}

impl ShardLayout {
    /// The shard of `range` of the model in `file`, whose identity is `identity`.
    pub fn of(file: &GgufFile, identity: &ModelIdentity, range: LayerRange) -> Result<Self> {
        if range.end > identity.n_layers {
            return Err(Error::InvalidArgument(format!(
                "layer range {range} lies outside the model's {} layers",
                identity.n_layers
            )));
        }
        let tensors: Vec<TensorInfo> = shard_tensors(file, range).into_iter().cloned().collect();
        let alignment = file.alignment;
        let mut offsets = Vec::with_capacity(tensors.len());
        let mut end = 0u64;
        for t in &tensors {
            offsets.push(end);
            end = (end + t.size).next_multiple_of(alignment);
        }
        let mut metadata: Vec<(String, Value)> = file
            .metadata
            .iter()
            .filter(|(key, _)| !is_tokenizer_key(key) && !key.starts_with("realm.shard."))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        metadata.push((
            KEY_MODEL_SHA256.to_string(),
            Value::String(identity.header_sha256.clone()),
        ));
        metadata.push((KEY_MODEL_BYTES.to_string(), Value::U64(identity.file_bytes)));
        metadata.push((
            KEY_LAYERS.to_string(),
            Value::Array(vec![
                Value::U32(range.start as u32),
                Value::U32(range.end as u32),
            ]),
        ));
        Ok(Self {
            metadata,
            tensors,
            offsets,
            alignment,
        })
    }

    /// The model's tensors of the shard, in directory order: what the digests are taken of.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The shard's header, with `digests[i]` the SHA-256 of `tensors()[i]`'s bytes.
    pub fn header(&self, digests: &[Digest32]) -> Vec<u8> {
        assert_eq!(digests.len(), self.tensors.len(), "one digest per tensor");
        let mut metadata = self.metadata.clone();
        metadata.push((
            KEY_TENSOR_SHA256.to_string(),
            Value::Array(digests.iter().map(|d| Value::String(hex(d))).collect()),
        ));
        let entries: Vec<TensorEntry<'_>> = self
            .tensors
            .iter()
            .zip(&self.offsets)
            .map(|(t, &offset)| TensorEntry {
                name: &t.name,
                dims: &t.dims,
                dtype: t.dtype,
                offset,
            })
            .collect();
        encode_header(&metadata, &entries, self.alignment)
    }
}

/// One tensor of a shard file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardTensor {
    pub name: String,
    /// Absolute offset in the shard file.
    pub offset: u64,
    pub size: u64,
    pub sha256: Digest32,
}

/// A shard's manifest, checked: what a worker needs to write, check and name a shard file.
#[derive(Debug, Clone)]
pub struct Manifest {
    header: Vec<u8>,
    address: String,
    identity: ModelIdentity,
    range: LayerRange,
    tensors: Vec<ShardTensor>,
    file_len: u64,
}

fn malformed(problem: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("malformed shard manifest: {problem}"))
}

impl Manifest {
    /// Checks a shard header received from a peer: a GGUF header, exactly padded, with the
    /// `realm.shard.*` keys, one digest per tensor and tensors that do not overlap.
    pub fn parse(header: Vec<u8>) -> Result<Self> {
        let parsed = parse_header(&header).map_err(malformed)?;
        let data_start = (parsed.len as u64).next_multiple_of(parsed.alignment);
        if header.len() as u64 != data_start {
            return Err(malformed(format!(
                "{} bytes, but the header with its padding is {data_start}",
                header.len()
            )));
        }
        let (identity, range) = source_of(&parsed.metadata)?.ok_or_else(|| {
            malformed(format!(
                "`{KEY_MODEL_SHA256}` is missing: not a shard header"
            ))
        })?;
        let digests = match parsed.metadata.get(KEY_TENSOR_SHA256) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().and_then(parse_hex))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| malformed(format!("`{KEY_TENSOR_SHA256}` holds a non-digest")))?,
            _ => return Err(malformed(format!("`{KEY_TENSOR_SHA256}` is missing"))),
        };
        if digests.len() != parsed.tensors.len() {
            return Err(malformed(format!(
                "{} digests for {} tensors",
                digests.len(),
                parsed.tensors.len()
            )));
        }
        if parsed.tensors.is_empty() {
            return Err(malformed("no tensors"));
        }
        let tensors: Vec<ShardTensor> = parsed
            .tensors
            .values()
            .zip(digests)
            .map(|(info, sha256)| ShardTensor {
                name: info.name.clone(),
                offset: info.offset,
                size: info.size,
                sha256,
            })
            .collect();
        let mut by_offset: Vec<&ShardTensor> = tensors.iter().collect();
        by_offset.sort_by_key(|t| t.offset);
        let mut end = data_start;
        for t in by_offset {
            if t.offset < end {
                return Err(malformed(format!("tensor `{}` overlaps another", t.name)));
            }
            end = t
                .offset
                .checked_add(t.size)
                .ok_or_else(|| malformed("overflow"))?;
        }
        Ok(Self {
            address: hex(&Sha256::digest(&header)),
            header,
            identity,
            range,
            tensors,
            file_len: end,
        })
    }

    /// The content address: SHA-256 (hex) of the header.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn header(&self) -> &[u8] {
        &self.header
    }

    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    pub fn range(&self) -> LayerRange {
        self.range
    }

    /// The tensors in directory order; an index into this is a tensor's index on the wire.
    pub fn tensors(&self) -> &[ShardTensor] {
        &self.tensors
    }

    /// Length of the shard file: its last tensor's end.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
}

/// The model identity and layer range a shard's metadata names; `None` for a file that is not a
/// shard.
pub fn source_of(
    metadata: &BTreeMap<String, Value>,
) -> Result<Option<(ModelIdentity, LayerRange)>> {
    let Some(sha) = metadata.get(KEY_MODEL_SHA256) else {
        return Ok(None);
    };
    let bad = |key: &str, what: &str| Error::Metadata {
        key: key.to_string(),
        problem: what.to_string(),
    };
    let header_sha256 = sha
        .as_str()
        .filter(|s| parse_hex(s).is_some())
        .ok_or_else(|| bad(KEY_MODEL_SHA256, "not a hex SHA-256"))?
        .to_string();
    let file_bytes = match metadata.get(KEY_MODEL_BYTES) {
        Some(Value::U64(n)) => *n,
        _ => return Err(bad(KEY_MODEL_BYTES, "missing or not a u64")),
    };
    let architecture = metadata
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("general.architecture", "missing"))?
        .to_string();
    let count_key = format!("{architecture}.block_count");
    let n_layers = metadata
        .get(&count_key)
        .and_then(Value::as_i64)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| bad(&count_key, "missing"))?;
    let range = match metadata.get(KEY_LAYERS) {
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::U32(start), Value::U32(end)] => {
                LayerRange::new(*start as usize, *end as usize).ok()
            }
            _ => None,
        },
        _ => None,
    }
    .filter(|r| r.end <= n_layers)
    .ok_or_else(|| bad(KEY_LAYERS, "not a layer range [start, end) of the model"))?;
    Ok(Some((
        ModelIdentity {
            header_sha256,
            file_bytes,
            architecture,
            n_layers,
        },
        range,
    )))
}

/// SHA-256 of each of the `file`'s tensors `tensors`, on `threads` threads. The bytes are read
/// from the file's mapping, as a delivery sends them, and each tensor's pages are given back
/// once hashed, so hashing a model does not leave it resident.
pub fn digest_tensors(
    file: &GgufFile,
    tensors: &[TensorInfo],
    threads: usize,
) -> Result<Vec<Digest32>> {
    each_in_parallel(tensors.len(), threads, |i| {
        let digest: Digest32 = Sha256::digest(file.tensor_bytes(&tensors[i])?).into();
        // The pages stay in the page cache; only this process's mapping of them goes.
        let _ = file.release_tensor(&tensors[i]);
        Ok(digest)
    })
}

/// Hashes each `(offset, length)` span of the file at `path`, read with `pread` in
/// [`READ_CHUNK`] pieces (so the file is never mapped), the spans spread over `threads` threads;
/// the results in span order.
pub fn hash_spans<H, R: Send>(
    path: &std::path::Path,
    spans: &[(u64, u64)],
    threads: usize,
    new: impl Fn() -> H + Sync,
    update: impl Fn(&mut H, &[u8]) + Sync,
    finish: impl Fn(H) -> R + Sync,
) -> Result<Vec<R>> {
    use std::os::unix::fs::FileExt;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let handle = std::fs::File::open(path).map_err(io)?;
    each_in_parallel(spans.len(), threads, |i| {
        let (offset, size) = spans[i];
        let mut buffer = vec![0u8; size.min(READ_CHUNK as u64) as usize];
        let mut hasher = new();
        let mut done = 0u64;
        while done < size {
            let n = (size - done).min(READ_CHUNK as u64) as usize;
            handle
                .read_exact_at(&mut buffer[..n], offset + done)
                .map_err(io)?;
            update(&mut hasher, &buffer[..n]);
            done += n as u64;
        }
        Ok(finish(hasher))
    })
}

/// `work(i)` for every `i` in `0..n`, on up to `threads` threads (this one among them), each
/// taking the next index as it finishes one; the results in index order, or the first error.
fn each_in_parallel<R: Send>(
    n: usize,
    threads: usize,
    work: impl Fn(usize) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<Option<R>>> =
        std::sync::Mutex::new((0..n).map(|_| None).collect());
    let run = || -> Result<()> {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                return Ok(());
            }
            let result = work(i)?;
            results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(result);
        }
    };
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads.clamp(1, n.max(1)))
            .map(|_| scope.spawn(run))
            .collect();
        let mut outcome = run();
        for helper in helpers {
            let joined = helper.join().unwrap_or_else(|_| {
                Err(Error::InvalidArgument("a hashing thread panicked".into()))
            });
            outcome = outcome.and(joined);
        }
        outcome
    })?;
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .collect::<Option<Vec<R>>>()
        .ok_or_else(|| Error::InvalidArgument("a hashing thread stopped early".into()))
}

/// Bytes read at a time when hashing or sending a tensor.
pub const READ_CHUNK: usize = 4 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{self, SyntheticArch, SyntheticDType, SyntheticSpec};

    fn model(arch: SyntheticArch) -> (tempfile::TempDir, GgufFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        synthetic::write(&path, &SyntheticSpec::fixture(arch, SyntheticDType::Q8_0)).unwrap();
        let file = GgufFile::open(&path).unwrap();
        (dir, file)
    }

    /// Writes the shard of `range` as a worker would: header, then every tensor at its offset.
    fn write_shard(file: &GgufFile, range: LayerRange, path: &std::path::Path) -> Manifest {
        let config = crate::model::ModelConfig::from_gguf(file).unwrap();
        let identity = ModelIdentity::of(file, &config);
        let layout = ShardLayout::of(file, &identity, range).unwrap();
        let digests = digest_tensors(file, layout.tensors(), 2).unwrap();
        let manifest = Manifest::parse(layout.header(&digests)).unwrap();
        let mut bytes = vec![0u8; manifest.file_len() as usize];
        bytes[..manifest.header().len()].copy_from_slice(manifest.header());
        for (t, source) in manifest.tensors().iter().zip(layout.tensors()) {
            assert_eq!(t.name, source.name);
            let data = file.tensor_bytes(source).unwrap();
            assert_eq!(Sha256::digest(data).as_slice(), t.sha256);
            bytes[t.offset as usize..][..data.len()].copy_from_slice(data);
        }
        std::fs::write(path, bytes).unwrap();
        manifest
    }

    #[test]
    fn a_shard_file_holds_the_layers_and_names_its_model() {
        let (dir, file) = model(SyntheticArch::Llama3);
        let range = LayerRange::new(1, 3).unwrap();
        let path = dir.path().join("shard.gguf");
        let manifest = write_shard(&file, range, &path);
        let shard = GgufFile::open_without_vocabulary(&path).unwrap();
        let names: Vec<&str> = shard.tensors.keys().map(String::as_str).collect();
        assert!(names.contains(&"rope_freqs.weight"), "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("blk.1.")
            || n.starts_with("blk.2.")
            || *n == "rope_freqs.weight"));
        assert!(!shard.metadata.keys().any(|k| k.starts_with("tokenizer.")));
        // The shard is the model, for the worker: same configuration and identity.
        let config = crate::model::ModelConfig::from_gguf(&file).unwrap();
        let shard_config = crate::model::ModelConfig::from_gguf(&shard).unwrap();
        assert_eq!(format!("{config:?}"), format!("{shard_config:?}"));
        let identity = ModelIdentity::of(&file, &config);
        assert_eq!(ModelIdentity::of(&shard, &shard_config), identity);
        assert_eq!(manifest.identity(), &identity);
        assert_eq!(manifest.range(), range);
        let (_, held) = source_of(&shard.metadata).unwrap().unwrap();
        assert_eq!(held, range);
        // Every tensor's bytes equal the model's.
        for t in manifest.tensors() {
            let a = shard
                .tensor_bytes(shard.tensor_info(&t.name).unwrap())
                .unwrap();
            let b = file
                .tensor_bytes(file.tensor_info(&t.name).unwrap())
                .unwrap();
            assert_eq!(a, b, "{}", t.name);
        }
    }

    #[test]
    fn a_manifest_that_lies_is_refused() {
        let (_dir, file) = model(SyntheticArch::Llama);
        let config = crate::model::ModelConfig::from_gguf(&file).unwrap();
        let identity = ModelIdentity::of(&file, &config);
        let layout = ShardLayout::of(&file, &identity, LayerRange::new(0, 2).unwrap()).unwrap();
        let digests = vec![[7u8; 32]; layout.tensors().len()];
        let header = layout.header(&digests);
        assert!(Manifest::parse(header.clone()).is_ok());
        // Cut short, or with bytes after the padding.
        assert!(Manifest::parse(header[..header.len() - 40].to_vec()).is_err());
        let mut long = header.clone();
        long.extend_from_slice(&[0; 32]);
        assert!(Manifest::parse(long).is_err());
        // A model file's header is no manifest.
        let model_header = {
            let bytes = std::fs::read(file.path()).unwrap();
            let parsed = parse_header(&bytes).unwrap();
            bytes[..(parsed.len as u64).next_multiple_of(parsed.alignment) as usize].to_vec()
        };
        let e = Manifest::parse(model_header).unwrap_err().to_string();
        assert!(e.contains("not a shard header"), "{e}");
        // Garbage.
        assert!(Manifest::parse(b"GGUF\x03\0\0\0".to_vec()).is_err());
        assert!(ShardLayout::of(&file, &identity, LayerRange::new(0, 99).unwrap()).is_err());
    }
}
