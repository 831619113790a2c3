//! GGUF reader (versions 2 and 3).
//!
//! The header is parsed from a read-only memory map; tensor data is never copied here. Nothing in
//! the header is trusted: every count, length and offset is checked against the bytes that remain
//! before anything is allocated or sliced, so a truncated or hostile file yields an [`Error::Gguf`]
//! naming the field and offset, never a panic or an allocation the file cannot back.
//!
//! Layout (all little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata
//! count, the metadata key/value pairs, one info record per tensor (name, `u32` rank, `u64` dims,
//! `u32` ggml type, `u64` offset into the data section), padding to `general.alignment`, then the
//! data section. Where the specification leaves room, the checks follow the common practice of GGUF readers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::mmap::MappedFile;
use crate::quant::{GgmlType, MAX_DIMS};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Arrays nest in principle; real files use one level. Bounding the depth bounds recursion.
const MAX_ARRAY_DEPTH: usize = 4;
/// Upper bound on the metadata values of one file, array elements included. A value costs Realm
/// about 32 bytes whatever its size in the file, so without a bound a file of one-byte array
/// elements could claim 32 times its own size in memory. Real vocabularies hold a few hundred
/// thousand entries.
const MAX_METADATA_VALUES: u64 = 1 << 24;
const KEY_ALIGNMENT: &str = "general.alignment";
/// The smallest key/value pair: key length, a one-byte key (keys may not be empty), type, a
/// one-byte value.
const MIN_KV_BYTES: u64 = 8 + 1 + 4 + 1;
/// The smallest tensor info: name length (names may be empty), rank, one dimension, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

// Metadata value type ids (`enum gguf_type`).
const TYPE_U8: u32 = 0;
const TYPE_I8: u32 = 1;
const TYPE_U16: u32 = 2;
const TYPE_I16: u32 = 3;
const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
const TYPE_U64: u32 = 10;
const TYPE_I64: u32 = 11;
const TYPE_F64: u32 = 12;

/// Bytes of the smallest encoding of a value of type `ty`, or `None` for an unknown type.
fn min_value_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        TYPE_U8 | TYPE_I8 | TYPE_BOOL => 1,
        TYPE_U16 | TYPE_I16 => 2,
        TYPE_U32 | TYPE_I32 | TYPE_F32 => 4,
        TYPE_U64 | TYPE_I64 | TYPE_F64 | TYPE_STRING => 8,
        TYPE_ARRAY => 4 + 8,
        _ => return None,
    })
}

/// A metadata value, in the file's own types.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => TYPE_U8,
            Value::I8(_) => TYPE_I8,
            Value::U16(_) => TYPE_U16,
            Value::I16(_) => TYPE_I16,
            Value::U32(_) => TYPE_U32,
            Value::I32(_) => TYPE_I32,
            Value::U64(_) => TYPE_U64,
            Value::I64(_) => TYPE_I64,
            Value::F32(_) => TYPE_F32,
            Value::F64(_) => TYPE_F64,
            Value::Bool(_) => TYPE_BOOL,
            Value::String(_) => TYPE_STRING,
            Value::Array(_) => TYPE_ARRAY,
        }
    }

    /// Appends the value's encoding, without its type id. An array takes the type of its first
    /// element (an empty one is written as an array of `u8`: it reads back empty all the same).
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Bool(v) => out.push(u8::from(*v)),
            Value::String(v) => encode_string(out, v),
            Value::Array(items) => {
                let ty = items.first().map_or(TYPE_U8, Value::type_id);
                out.extend_from_slice(&ty.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    item.encode(out);
                }
            }
        }
    }

    /// The value as a signed integer, if it is an integer of any width that fits `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => i64::try_from(v).ok()?,
            Value::I64(v) => v,
            _ => return None,
        })
    }

    /// The value as a float, if it is a number of any type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    /// Absolute byte offset in the file; checked, with `size`, to lie inside the file.
    pub offset: u64,
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements (saturating; a parsed tensor's count is known not to overflow).
    pub fn elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }
}

/// An opened GGUF file: its metadata, its tensor directory and the mapped bytes behind them.
#[derive(Debug, Clone)]
pub struct GgufFile {
    path: PathBuf,
    map: Arc<MappedFile>,
    pub version: u32,
    pub alignment: u64,
    /// Shared by the clones of the file: a vocabulary's metadata runs to tens of MB.
    pub metadata: Arc<BTreeMap<String, Value>>,
    pub tensors: Arc<BTreeMap<String, TensorInfo>>,
    header_len: usize,
}

/// Metadata keys of the tokenizer's vocabulary: its tokens, scores, types and merges, which
/// only a tokenizer reads.
const VOCABULARY_KEYS: [&str; 4] = [
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
];

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_keeping(path.as_ref(), &|_| true)
    }

    /// Opens the file for running its blocks alone: the vocabulary's metadata (tens of MB for
    /// a 262k-token vocabulary) is checked like the rest but not kept.
    pub fn open_without_vocabulary(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_keeping(path.as_ref(), &|key| !VOCABULARY_KEYS.contains(&key))
    }

    fn open_keeping(path: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Self> {
        let map = Arc::new(MappedFile::open(path)?);
        let header = Header::parse(map.bytes(), map.bytes().len() as u64, keep)
            .map_err(|e| Error::Gguf(format!("{}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            version: header.version,
            alignment: header.alignment,
            metadata: Arc::new(header.metadata),
            tensors: Arc::new(header.tensors),
            header_len: header.len,
        })
    }

    /// SHA-256 (lower-case hex) of the header: magic, metadata and tensor directory. Two files
    /// with the same header hash and length hold the same model layout; hashing the header
    /// instead of the whole file keeps this instant for files of any size.
    pub fn header_sha256(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(&self.map.bytes()[..self.header_len]);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The header with its padding: the bytes before the data section.
    pub fn header_bytes(&self) -> &[u8] {
        let bytes = self.map.bytes();
        let end = (self.header_len as u64).next_multiple_of(self.alignment);
        usize::try_from(end)
            .ok()
            .and_then(|end| bytes.get(..end))
            .unwrap_or(bytes)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the whole file in bytes.
    pub fn file_len(&self) -> u64 {
        self.map.bytes().len() as u64
    }

    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))
    }

    /// The raw (still quantized) bytes of a tensor, borrowed from the mapping.
    ///
    /// The infos of this file were checked when it was opened; an info edited since, or taken
    /// from another file, is checked again here rather than trusted.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<&[u8]> {
        let bytes = self.map.bytes();
        let start = usize::try_from(info.offset).ok();
        let len = usize::try_from(info.size).ok();
        start
            .zip(len)
            .and_then(|(start, len)| bytes.get(start..start.checked_add(len)?))
            .ok_or_else(|| Error::Tensor {
                name: info.name.clone(),
                problem: format!(
                    "{} bytes at offset {} lie outside {} ({} bytes)",
                    info.size,
                    info.offset,
                    self.path.display(),
                    bytes.len()
                ),
            })
    }

    /// A tensor's bytes as a handle that keeps the mapping alive: weights computed straight
    /// from the file's pages, with no copy.
    pub fn tensor_data(&self, info: &TensorInfo) -> Result<TensorData> {
        let bytes = self.tensor_bytes(info)?;
        let start = bytes.as_ptr() as usize - self.map.bytes().as_ptr() as usize;
        Ok(TensorData {
            map: Arc::clone(&self.map),
            start,
            len: bytes.len(),
        })
    }

    /// Maps `info`'s pages into the process now (see [`MappedFile::populate`]).
    pub fn populate_tensor(&self, info: &TensorInfo) -> Result<()> {
        let data = self.tensor_data(info)?;
        self.map
            .populate(data.start, data.len)
            .map_err(|e| self.io_error(e))
    }

    /// Reads `buf.len()` bytes of `info`'s from `from` out of the file, mapping none of its pages
    /// (see [`MappedFile::read_at`]).
    pub fn read_tensor_range(&self, info: &TensorInfo, from: usize, buf: &mut [u8]) -> Result<()> {
        let (start, size) = self.span_of(info)?;
        if from.checked_add(buf.len()).is_none_or(|end| end > size) {
            return Err(self.io_error(std::io::ErrorKind::InvalidInput.into()));
        }
        self.map
            .read_at(start + from, buf)
            .map_err(|e| self.io_error(e))
    }

    /// Gives the mapped pages of `info`'s bytes back to the OS (see [`MappedFile::release`]): a
    /// caller that has copied a tensor out of the mapping calls this so the file's pages do not
    /// stay resident beside the copy. Reading the tensor again later still works.
    pub fn release_tensor(&self, info: &TensorInfo) -> Result<()> {
        self.release_tensor_part(info, usize::MAX)
    }

    /// [`release_tensor`](Self::release_tensor) for the first `len` bytes of `info`'s (all of
    /// them if it has fewer).
    pub fn release_tensor_part(&self, info: &TensorInfo, len: usize) -> Result<()> {
        let (start, size) = self.span_of(info)?;
        self.map
            .release(start, len.min(size))
            .map_err(|e| self.io_error(e))
    }

    /// Where `info`'s bytes start in the file, and how many there are.
    fn span_of(&self, info: &TensorInfo) -> Result<(usize, usize)> {
        let too_large = || self.io_error(std::io::ErrorKind::InvalidInput.into());
        let start = usize::try_from(info.offset).map_err(|_| too_large())?;
        let size = usize::try_from(info.size).map_err(|_| too_large())?;
        Ok((start, size))
    }

    fn io_error(&self, source: std::io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            source,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| Error::Metadata {
            key: key.to_string(),
            problem: "missing".to_string(),
        })
    }

    fn wrong_type(key: &str, want: &str, got: &Value) -> Error {
        Error::Metadata {
            key: key.to_string(),
            problem: format!("expected {want}, found {}", got.type_name()),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| Self::wrong_type(key, "string", v))
    }

    /// An integer key that must fit `usize` and be non-negative.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let v = self.require(key)?;
        let invalid = |shown: String| Error::Metadata {
            key: key.to_string(),
            problem: format!("{shown} is not a valid count"),
        };
        if let Value::U64(u) = *v {
            return usize::try_from(u).map_err(|_| invalid(u.to_string()));
        }
        let i = v
            .as_i64()
            .ok_or_else(|| Self::wrong_type(key, "integer", v))?;
        usize::try_from(i).map_err(|_| invalid(i.to_string()))
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        v.as_f64()
            .map(|f| f as f32)
            .ok_or_else(|| Self::wrong_type(key, "number", v))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(Self::wrong_type(key, "bool", v)),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value]> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            v => Err(Self::wrong_type(key, "array", v)),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.get_array(key)?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| Self::wrong_type(key, "array of strings", v))
            })
            .collect()
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.get_array(key)?
            .iter()
            .map(|v| {
                v.as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| Self::wrong_type(key, "array of numbers", v))
            })
            .collect()
    }

    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>> {
        self.get_array(key)?
            .iter()
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| Self::wrong_type(key, "array of integers", v))
            })
            .collect()
    }
}

/// A parse failure, later wrapped with the file name into [`Error::Gguf`].
type Parse<T> = std::result::Result<T, String>;

/// Describes the field being read; only called to build an error message, so the hot path over
/// large vocabularies formats nothing.
type What<'w> = &'w dyn Fn() -> String;

/// The bytes of one tensor inside a mapped GGUF file, kept alive by this handle.
#[derive(Debug, Clone)]
pub struct TensorData {
    map: Arc<MappedFile>,
    start: usize,
    len: usize,
}

impl TensorData {
    pub fn bytes(&self) -> &[u8] {
        // In range by construction: `GgufFile::tensor_data` took it from a checked slice.
        &self.map.bytes()[self.start..self.start + self.len]
    }

    /// `len` bytes from `offset` of the tensor's (as many as there are), as a handle of its own.
    pub fn part(&self, offset: usize, len: usize) -> TensorData {
        let offset = offset.min(self.len);
        TensorData {
            map: Arc::clone(&self.map),
            start: self.start + offset,
            len: len.min(self.len - offset),
        }
    }
}

impl AsRef<[u8]> for TensorData {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

fn encode_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// One record of a tensor directory to encode.
#[derive(Debug, Clone, Copy)]
pub struct TensorEntry<'a> {
    pub name: &'a str,
    pub dims: &'a [u64],
    pub dtype: GgmlType,
    /// Offset in the data section (a multiple of the alignment).
    pub offset: u64,
}

/// Encodes a GGUF version 3 header: `metadata` in the order given, then the tensor directory,
/// padded with zeros to `alignment` (which `metadata` must declare as `general.alignment` unless
/// it is the default, 32). The data section follows it.
pub fn encode_header(
    metadata: &[(String, Value)],
    tensors: &[TensorEntry<'_>],
    alignment: u64,
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        encode_string(&mut out, key);
        out.extend_from_slice(&value.type_id().to_le_bytes());
        value.encode(&mut out);
    }
    for t in tensors {
        encode_string(&mut out, t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.dtype.id().to_le_bytes());
        out.extend_from_slice(&t.offset.to_le_bytes());
    }
    let padded = (out.len() as u64).next_multiple_of(alignment.max(1));
    out.resize(padded as usize, 0);
    out
}

/// Parses a header on its own, without the data section behind it: `bytes` may end anywhere
/// after the tensor directory. Offsets are checked for overflow only, since the file's length is
/// not known; the tensors' offsets are absolute, as in a file that starts with `bytes`.
pub fn parse_header(bytes: &[u8]) -> Result<Header> {
    Header::parse(bytes, u64::MAX, &|_| true).map_err(Error::Gguf)
}

/// A parsed header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub alignment: u64,
    /// Bytes of the header proper: magic through the last tensor info.
    pub len: usize,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl Header {
    /// Parses the header of a file of `file_len` bytes that starts with `bytes`, keeping the
    /// metadata entries whose key `keep` accepts (every entry is checked).
    fn parse(bytes: &[u8], file_len: u64, keep: &dyn Fn(&str) -> bool) -> Parse<Self> {
        let mut r = Reader {
            bytes,
            pos: 0,
            values_left: MAX_METADATA_VALUES,
        };
        let magic = r.take(4, &|| "magic".into())?;
        if magic != MAGIC {
            return Err(format!("bad magic {magic:02x?}, expected \"GGUF\""));
        }
        let version = r.u32(&|| "version".into())?;
        if !(2..=3).contains(&version) {
            let hint = if (2..=3).contains(&version.swap_bytes()) {
                " (a big-endian file? Realm reads little-endian GGUF only)"
            } else {
                ""
            };
            return Err(format!(
                "unsupported GGUF version {version}{hint}; Realm reads versions 2 and 3"
            ));
        }
        let tensor_count = r.u64(&|| "tensor count".into())?;
        let kv_count = r.u64(&|| "metadata count".into())?;
        r.check_count(tensor_count, MIN_TENSOR_INFO_BYTES, &|| {
            "tensor count".into()
        })?;
        r.check_count(kv_count, MIN_KV_BYTES, &|| "metadata count".into())?;

        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.string(&|| format!("key of metadata entry {i}"))?;
            if key.is_empty() {
                return Err(format!("key of metadata entry {i} is empty"));
            }
            let what = || format!("`{key}`");
            let ty = r.u32(&|| format!("type of `{key}`"))?;
            r.spend_values(1, &what)?;
            let kept = keep(&key);
            let value = r.value(ty, &what, 0, kept)?;
            if kept && metadata.insert(key.clone(), value).is_some() {
                return Err(format!("duplicate metadata key `{key}`"));
            }
        }

        let alignment = match metadata.get(KEY_ALIGNMENT) {
            None => DEFAULT_ALIGNMENT,
            Some(&Value::U32(a)) if a.is_power_of_two() => a.into(),
            Some(Value::U32(a)) => {
                return Err(format!("`{KEY_ALIGNMENT}` is {a}, not a power of two"));
            }
            Some(v) => {
                return Err(format!(
                    "`{KEY_ALIGNMENT}` must be a u32, found {}",
                    v.type_name()
                ));
            }
        };

        // The metadata used up bytes the tensor count was first checked against.
        r.check_count(tensor_count, MIN_TENSOR_INFO_BYTES, &|| {
            "tensor count".into()
        })?;
        let mut infos = Vec::new();
        for i in 0..tensor_count {
            infos.push(r.tensor_info(i)?);
        }

        let data_start = (r.pos as u64)
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| format!("data section offset overflows at alignment {alignment}"))?;
        if !infos.is_empty() && data_start > file_len {
            return Err(format!(
                "truncated: file ends at {file_len} bytes, before the tensor data section at {data_start}"
            ));
        }

        let mut tensors = BTreeMap::new();
        for (name, dims, dtype, offset) in infos {
            let size = dtype
                .checked_size(&dims)
                .map_err(|problem| format!("tensor `{name}`: {problem}"))?;
            if offset % alignment != 0 {
                return Err(format!(
                    "tensor `{name}` at data offset {offset} is not aligned to {alignment}"
                ));
            }
            let start = data_start
                .checked_add(offset)
                .filter(|s| *s <= file_len)
                .ok_or_else(|| {
                    format!(
                        "tensor `{name}` starts at data offset {offset}, past the end of the file ({file_len} bytes)"
                    )
                })?;
            if size > file_len - start {
                return Err(format!(
                    "tensor `{name}` ({size} bytes at file offset {start}) runs past the end of the file ({file_len} bytes)"
                ));
            }
            let info = TensorInfo {
                name: name.clone(),
                dims,
                dtype,
                offset: start,
                size,
            };
            if tensors.insert(name.clone(), info).is_some() {
                return Err(format!("duplicate tensor name `{name}`"));
            }
        }
        Ok(Self {
            version,
            alignment,
            len: r.pos,
            metadata,
            tensors,
        })
    }
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    /// Never past `bytes.len()`.
    pos: usize,
    /// Metadata values the file may still create; see [`MAX_METADATA_VALUES`].
    values_left: u64,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: u64, what: What) -> Parse<&'a [u8]> {
        let out = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .and_then(|end| self.bytes.get(self.pos..end))
            .ok_or_else(|| {
                format!(
                    "truncated: {} needs {n} bytes at offset {}, only {} remain",
                    what(),
                    self.pos,
                    self.remaining()
                )
            })?;
        self.pos += out.len();
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: What) -> Parse<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: What) -> Parse<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: What) -> Parse<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Rejects a count of items that could not fit in the rest of the file even at `min_size`
    /// bytes each, before anything is allocated for them.
    fn check_count(&self, count: u64, min_size: u64, what: What) -> Parse<()> {
        if count.saturating_mul(min_size) > self.remaining() as u64 {
            return Err(format!(
                "{} is {count}, more than the {} bytes left at offset {} can hold",
                what(),
                self.remaining(),
                self.pos
            ));
        }
        Ok(())
    }

    fn spend_values(&mut self, count: u64, what: What) -> Parse<()> {
        self.values_left = self.values_left.checked_sub(count).ok_or_else(|| {
            format!(
                "{} brings the metadata past {MAX_METADATA_VALUES} values",
                what()
            )
        })?;
        Ok(())
    }

    fn string(&mut self, what: What) -> Parse<String> {
        Ok(self.str(what)?.to_string())
    }

    /// A string, borrowed from the file's bytes.
    fn str(&mut self, what: What) -> Parse<&'a str> {
        let length = || format!("length of {}", what());
        let len = self.u64(&length)?;
        self.check_count(len, 1, &length)?;
        let at = self.pos;
        let raw = self.take(len, what)?;
        std::str::from_utf8(raw)
            .map_err(|_| format!("{} at offset {at} is not valid UTF-8", what()))
    }

    /// The value of type `ty` at the cursor; with `keep` false it is checked and passed over,
    /// and what comes back holds none of its strings or elements.
    fn value(&mut self, ty: u32, what: What, depth: usize, keep: bool) -> Parse<Value> {
        Ok(match ty {
            TYPE_U8 => Value::U8(u8::from_le_bytes(self.array(what)?)),
            TYPE_I8 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            TYPE_U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            TYPE_I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            TYPE_U32 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            TYPE_I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            TYPE_F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            TYPE_BOOL => match self.array::<1>(what)? {
                [0] => Value::Bool(false),
                [1] => Value::Bool(true),
                [b] => return Err(format!("{} holds bool byte {b}, not 0 or 1", what())),
            },
            TYPE_STRING if keep => Value::String(self.string(what)?),
            TYPE_STRING => {
                self.str(what)?;
                Value::String(String::new())
            }
            TYPE_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!(
                        "{} nests arrays deeper than {MAX_ARRAY_DEPTH}",
                        what()
                    ));
                }
                let elem_ty = self.u32(&|| format!("element type of {}", what()))?;
                let min_size = min_value_bytes(elem_ty).ok_or_else(|| {
                    format!("{} has unknown array element type {elem_ty}", what())
                })?;
                let length = || format!("length of {}", what());
                let count = self.u64(&length)?;
                self.check_count(count, min_size, &length)?;
                self.spend_values(count, &length)?;
                // Both checks above bound `count` by the bytes left, so the allocation is backed.
                let capacity = if keep { count } else { 0 };
                let mut items = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
                for i in 0..count {
                    let element = || format!("element {i} of {}", what());
                    let item = self.value(elem_ty, &element, depth + 1, keep)?;
                    if keep {
                        items.push(item);
                    }
                }
                Value::Array(items)
            }
            TYPE_U64 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            TYPE_I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            TYPE_F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(format!("{} has unknown value type {other}", what())),
        })
    }

    /// One tensor info record: name, dimensions, type and data-section offset, unvalidated
    /// except for the rank and the type id.
    fn tensor_info(&mut self, i: u64) -> Parse<(String, Vec<u64>, GgmlType, u64)> {
        let name = self.string(&|| format!("name of tensor {i}"))?;
        let n_dims = self.u32(&|| format!("dimension count of `{name}`"))?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(format!(
                "tensor `{name}` has {n_dims} dimensions (1..={MAX_DIMS} allowed)"
            ));
        }
        let mut dims = Vec::with_capacity(MAX_DIMS);
        for d in 0..n_dims {
            dims.push(self.u64(&|| format!("dimension {d} of `{name}`"))?);
        }
        let type_id = self.u32(&|| format!("type of `{name}`"))?;
        let dtype = GgmlType::from_id(type_id).ok_or_else(|| {
            format!("tensor `{name}` has unknown or unsupported ggml type id {type_id}")
        })?;
        let offset = self.u64(&|| format!("offset of `{name}`"))?;
        Ok((name, dims, dtype, offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Writes GGUF fields one by one; malformed files are made by writing the wrong field.
    #[derive(Default)]
    struct W {
        buf: Vec<u8>,
    }

    impl W {
        fn u8(&mut self, v: u8) -> &mut Self {
            self.buf.push(v);
            self
        }
        fn u32(&mut self, v: u32) -> &mut Self {
            self.buf.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.buf.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn raw(&mut self, v: &[u8]) -> &mut Self {
            self.buf.extend_from_slice(v);
            self
        }
        /// A GGUF string: `u64` length, then the bytes (not necessarily UTF-8).
        fn str(&mut self, v: &[u8]) -> &mut Self {
            self.u64(v.len() as u64).raw(v)
        }
        fn header(&mut self, version: u32, tensors: u64, kvs: u64) -> &mut Self {
            self.raw(b"GGUF").u32(version).u64(tensors).u64(kvs)
        }
        fn kv(&mut self, key: &str, v: &Value) -> &mut Self {
            self.str(key.as_bytes()).u32(v.type_id());
            self.payload(v)
        }
        fn payload(&mut self, v: &Value) -> &mut Self {
            v.encode(&mut self.buf);
            self
        }
        fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
            self.str(name.as_bytes()).u32(dims.len() as u32);
            for &d in dims {
                self.u64(d);
            }
            self.u32(ty).u64(offset)
        }
        fn pad(&mut self, alignment: usize) -> &mut Self {
            while !self.buf.len().is_multiple_of(alignment) {
                self.buf.push(0);
            }
            self
        }
    }

    const F32_ID: u32 = 0;
    const Q4_0_ID: u32 = 2;
    const Q8_0_ID: u32 = 8;

    fn open(bytes: &[u8]) -> Result<GgufFile> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytes).unwrap();
        file.flush().unwrap();
        GgufFile::open(file.path())
    }

    /// The message of the `Error::Gguf` that opening `bytes` must give.
    fn gguf_error(bytes: &[u8]) -> String {
        match open(bytes) {
            Err(Error::Gguf(msg)) => msg,
            Err(other) => panic!("expected a GGUF error, got {other:?}"),
            Ok(_) => panic!("malformed file was accepted"),
        }
    }

    fn assert_gguf_error(bytes: &[u8], needles: &[&str]) {
        let msg = gguf_error(bytes);
        for needle in needles {
            assert!(
                msg.contains(needle),
                "error {msg:?} does not mention {needle:?}"
            );
        }
    }

    /// One metadata value of every type, arrays of every element type, an empty array and an
    /// array of arrays.
    fn every_value() -> Vec<(&'static str, Value)> {
        use Value::*;
        vec![
            ("t.u8", U8(0xfe)),
            ("t.i8", I8(-100)),
            ("t.u16", U16(0xbeef)),
            ("t.i16", I16(-30_000)),
            ("t.u32", U32(0xdead_beef)),
            ("t.i32", I32(-2_000_000_000)),
            ("t.u64", U64(u64::MAX)),
            ("t.i64", I64(i64::MIN)),
            ("t.f32", F32(-1.5e-3)),
            ("t.f64", F64(std::f64::consts::PI)),
            ("t.bool.true", Bool(true)),
            ("t.bool.false", Bool(false)),
            ("t.string", String("héllo ✓".into())),
            ("t.string.empty", String(std::string::String::new())),
            ("t.arr.u8", Array(vec![U8(1), U8(255)])),
            ("t.arr.i8", Array(vec![I8(-1), I8(127)])),
            ("t.arr.u16", Array(vec![U16(1), U16(65535)])),
            ("t.arr.i16", Array(vec![I16(-1), I16(300)])),
            ("t.arr.u32", Array(vec![U32(1), U32(7)])),
            ("t.arr.i32", Array(vec![I32(-5), I32(5)])),
            ("t.arr.u64", Array(vec![U64(1 << 40)])),
            ("t.arr.i64", Array(vec![I64(-(1 << 40))])),
            ("t.arr.f32", Array(vec![F32(0.25), F32(-8.0)])),
            ("t.arr.f64", Array(vec![F64(1e300)])),
            ("t.arr.bool", Array(vec![Bool(true), Bool(false)])),
            (
                "t.arr.string",
                Array(vec![String("a".into()), String("".into())]),
            ),
            ("t.arr.empty", Array(vec![])),
            (
                "t.arr.nested",
                Array(vec![Array(vec![U32(1), U32(2)]), Array(vec![U32(3)])]),
            ),
        ]
    }

    /// A small valid file: metadata of every type, an F32 and a Q8_0 tensor.
    fn sample_file(version: u32) -> Vec<u8> {
        let kvs = every_value();
        let mut w = W::default();
        w.header(version, 2, kvs.len() as u64);
        for (k, v) in &kvs {
            w.kv(k, v);
        }
        w.tensor("a", &[4, 2], F32_ID, 0);
        w.tensor("b", &[32], Q8_0_ID, 32);
        w.pad(32);
        for i in 0..8 {
            w.raw(&(i as f32).to_le_bytes());
        }
        w.raw(&half::f16::from_f32(0.5).to_le_bytes());
        for i in 0..32u8 {
            w.u8(i.wrapping_mul(3));
        }
        w.buf
    }

    /// A file with one tensor whose info is written by `tensor`, and `data` bytes of data.
    fn one_tensor(tensor: impl FnOnce(&mut W), data: usize) -> Vec<u8> {
        let mut w = W::default();
        w.header(3, 1, 0);
        tensor(&mut w);
        w.pad(32);
        w.raw(&vec![0u8; data]);
        w.buf
    }

    /// A file with one key/value pair written by `kv` and no tensors.
    fn one_kv(kv: impl FnOnce(&mut W)) -> Vec<u8> {
        let mut w = W::default();
        w.header(3, 0, 1);
        kv(&mut w);
        w.buf
    }

    #[test]
    fn every_value_type_round_trips_in_v2_and_v3() {
        for version in [2, 3] {
            let file = open(&sample_file(version)).unwrap();
            assert_eq!(file.version, version);
            assert_eq!(file.alignment, DEFAULT_ALIGNMENT);
            let want: BTreeMap<String, Value> = every_value()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            assert_eq!(*file.metadata, want);

            let a = file.tensor_info("a").unwrap();
            assert_eq!(a.dims, vec![4, 2]);
            assert_eq!(a.dtype, GgmlType::F32);
            assert_eq!(a.elements(), 8);
            assert_eq!(a.size, 32);
            assert_eq!(a.offset % 32, 0);
            let floats: Vec<f32> = file
                .tensor_bytes(a)
                .unwrap()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(floats, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);

            let b = file.tensor_info("b").unwrap();
            assert_eq!(
                (b.dtype, b.size, b.offset),
                (GgmlType::Q8_0, 34, a.offset + 32)
            );
            assert_eq!(b.offset + b.size, file.file_len());
            assert_eq!(&file.tensor_bytes(b).unwrap()[2..5], &[0, 3, 6]);
            // Read from the file rather than the mapping: the same bytes, and none past the
            // tensor's end.
            let mut buf = [0u8; 3];
            file.read_tensor_range(b, 2, &mut buf).unwrap();
            assert_eq!(buf, [0, 3, 6]);
            let mut past = [0u8; 2];
            assert!(file.read_tensor_range(b, 33, &mut past).is_err());
            assert!(file.read_tensor_range(b, usize::MAX, &mut past).is_err());
        }
    }

    #[test]
    fn typed_getters() {
        let mut w = W::default();
        w.header(3, 0, 6)
            .kv("s", &Value::String("llama".into()))
            .kv("n", &Value::U32(30))
            .kv("neg", &Value::I32(-1))
            .kv("big", &Value::U64(u64::MAX))
            .kv("eps", &Value::F32(1e-5))
            .kv("words", &Value::Array(vec![Value::String("x".into())]));
        let file = open(&w.buf).unwrap();
        assert_eq!(file.get_str("s").unwrap(), "llama");
        assert_eq!(file.get_usize("n").unwrap(), 30);
        assert_eq!(file.get_f32("n").unwrap(), 30.0);
        assert_eq!(file.get_f32("eps").unwrap(), 1e-5);
        assert_eq!(file.get_str_array("words").unwrap(), ["x"]);
        assert_eq!(
            file.get("big").and_then(Value::as_f64),
            Some(u64::MAX as f64)
        );
        let problem = |r: Result<usize>| match r {
            Err(Error::Metadata { problem, .. }) => problem,
            other => panic!("expected a metadata error, got {other:?}"),
        };
        assert!(problem(file.get_usize("neg")).contains("not a valid count"));
        assert!(problem(file.get_usize("s")).contains("expected integer, found string"));
        assert!(problem(file.get_usize("absent")).contains("missing"));
        if usize::BITS < 64 {
            assert!(problem(file.get_usize("big")).contains("not a valid count"));
        }
        assert!(matches!(file.get_bool("s"), Err(Error::Metadata { .. })));
        assert!(matches!(
            file.get_f32_array("words"),
            Err(Error::Metadata { .. })
        ));
        assert!(matches!(
            file.tensor_info("x"),
            Err(Error::MissingTensor(_))
        ));
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let full = sample_file(3);
        for len in 0..full.len() {
            let msg = gguf_error(&full[..len]);
            assert!(
                ["truncated", "past the end", "can hold"]
                    .iter()
                    .any(|needle| msg.contains(needle)),
                "truncation at {len} gave {msg:?}"
            );
        }
        open(&full).unwrap();
    }

    #[test]
    fn bad_magic() {
        let mut bytes = sample_file(3);
        bytes[..4].copy_from_slice(b"GGML");
        assert_gguf_error(&bytes, &["bad magic"]);
    }

    #[test]
    fn unsupported_versions() {
        for version in [0, 1, 4, u32::MAX] {
            let mut w = W::default();
            w.header(version, 0, 0);
            assert_gguf_error(&w.buf, &["unsupported GGUF version", &version.to_string()]);
        }
        let mut w = W::default();
        w.header(3u32.swap_bytes(), 0, 0);
        assert_gguf_error(&w.buf, &["big-endian"]);
    }

    #[test]
    fn absurd_counts() {
        for count in [u64::MAX, 1 << 40, 1000] {
            let mut w = W::default();
            w.header(3, count, 0);
            assert_gguf_error(&w.buf, &["tensor count", "can hold"]);
            let mut w = W::default();
            w.header(3, 0, count);
            assert_gguf_error(&w.buf, &["metadata count", "can hold"]);
        }
    }

    #[test]
    fn absurd_string_lengths() {
        let bytes = one_kv(|w| {
            w.u64(u64::MAX).raw(b"key").u32(TYPE_U8).u8(0);
        });
        assert_gguf_error(&bytes, &["length of key of metadata entry 0", "can hold"]);
        let bytes = one_kv(|w| {
            w.str(b"k").u32(TYPE_STRING).u64(1 << 62).raw(b"short");
        });
        assert_gguf_error(
            &bytes,
            &["length of `k` is 4611686018427387904", "can hold"],
        );
        let bytes = one_tensor(
            |w| {
                w.u64(u64::MAX - 3)
                    .raw(b"t")
                    .u32(1)
                    .u64(32)
                    .u32(F32_ID)
                    .u64(0);
            },
            128,
        );
        assert_gguf_error(&bytes, &["length of name of tensor 0", "can hold"]);
    }

    #[test]
    fn absurd_array_lengths() {
        for (elem, count) in [
            (TYPE_U8, u64::MAX),
            (TYPE_U64, 1 << 61),
            (TYPE_STRING, 1 << 40),
            (TYPE_ARRAY, 1 << 40),
        ] {
            let bytes = one_kv(|w| {
                w.str(b"arr")
                    .u32(TYPE_ARRAY)
                    .u32(elem)
                    .u64(count)
                    .raw(&[0; 64]);
            });
            assert_gguf_error(&bytes, &["length of `arr`", "can hold"]);
        }
        // An element count that does not fit in the rest of an array of arrays.
        let bytes = one_kv(|w| {
            w.str(b"arr").u32(TYPE_ARRAY).u32(TYPE_ARRAY).u64(1);
            w.u32(TYPE_U32).u64(1 << 50).u32(7);
        });
        assert_gguf_error(&bytes, &["length of element 0 of `arr`", "can hold"]);
    }

    #[test]
    fn metadata_value_budget_bounds_memory() {
        let count = MAX_METADATA_VALUES; // plus the key's own value
        let bytes = one_kv(|w| {
            w.str(b"arr").u32(TYPE_ARRAY).u32(TYPE_U8).u64(count);
            w.raw(&vec![0u8; count as usize]);
        });
        assert_gguf_error(&bytes, &["length of `arr`", "past 16777216 values"]);
    }

    #[test]
    fn unknown_value_types() {
        for ty in [13, 99, u32::MAX] {
            let bytes = one_kv(|w| {
                w.str(b"k").u32(ty).u64(0);
            });
            assert_gguf_error(&bytes, &["`k` has unknown value type", &ty.to_string()]);
            let bytes = one_kv(|w| {
                w.str(b"k").u32(TYPE_ARRAY).u32(ty).u64(0);
            });
            assert_gguf_error(
                &bytes,
                &["`k` has unknown array element type", &ty.to_string()],
            );
        }
    }

    #[test]
    fn bad_bool_and_deep_nesting() {
        let bytes = one_kv(|w| {
            w.str(b"flag").u32(TYPE_BOOL).u8(2);
        });
        assert_gguf_error(&bytes, &["`flag` holds bool byte 2"]);
        let bytes = one_kv(|w| {
            w.str(b"deep").u32(TYPE_ARRAY);
            for _ in 0..=MAX_ARRAY_DEPTH {
                w.u32(TYPE_ARRAY).u64(1);
            }
            w.raw(&[0; 64]);
        });
        assert_gguf_error(&bytes, &["nests arrays deeper than 4"]);
    }

    #[test]
    fn keys_must_be_unique_non_empty_utf8() {
        let mut w = W::default();
        w.header(3, 0, 2)
            .kv("dup", &Value::U8(1))
            .kv("dup", &Value::U8(2));
        assert_gguf_error(&w.buf, &["duplicate metadata key `dup`"]);
        let bytes = one_kv(|w| {
            w.str(b"").u32(TYPE_U8).u8(0).raw(&[0; 8]);
        });
        assert_gguf_error(&bytes, &["key of metadata entry 0 is empty"]);
        let bytes = one_kv(|w| {
            w.str(b"bad\xff").u32(TYPE_U8).u8(0);
        });
        assert_gguf_error(&bytes, &["key of metadata entry 0", "not valid UTF-8"]);
    }

    #[test]
    fn strings_must_be_utf8() {
        let bytes = one_kv(|w| {
            w.str(b"k").u32(TYPE_STRING).str(b"\xc3\x28");
        });
        assert_gguf_error(&bytes, &["`k`", "not valid UTF-8"]);
        let bytes = one_kv(|w| {
            w.str(b"k").u32(TYPE_ARRAY).u32(TYPE_STRING).u64(2);
            w.str(b"ok").str(b"\xed\xa0\x80"); // an encoded surrogate
        });
        assert_gguf_error(&bytes, &["element 1 of `k`", "not valid UTF-8"]);
        let bytes = one_tensor(
            |w| {
                w.str(b"\x80").u32(1).u64(8).u32(F32_ID).u64(0);
            },
            32,
        );
        assert_gguf_error(&bytes, &["name of tensor 0", "not valid UTF-8"]);
    }

    #[test]
    fn unknown_tensor_types() {
        // 4 and 5 are ggml's removed Q4_2/Q4_3; 16 onwards (i-quants...) are not read by Realm.
        for ty in [4, 5, 16, 29, 31, 99, u32::MAX] {
            let bytes = one_tensor(
                |w| {
                    w.tensor("w", &[32], ty, 0);
                },
                256,
            );
            assert_gguf_error(
                &bytes,
                &[
                    "`w` has unknown or unsupported ggml type id",
                    &ty.to_string(),
                ],
            );
        }
    }

    #[test]
    fn tensor_offsets_and_sizes_must_lie_in_the_file() {
        let bytes = one_tensor(
            |w| {
                w.tensor("w", &[8], F32_ID, 1 << 40);
            },
            32,
        );
        assert_gguf_error(
            &bytes,
            &["`w` starts at data offset 1099511627776", "past the end"],
        );
        // An aligned offset so large that data start + offset overflows.
        let bytes = one_tensor(
            |w| {
                w.tensor("w", &[8], F32_ID, u64::MAX - 31);
            },
            32,
        );
        assert_gguf_error(&bytes, &["`w` starts at data offset", "past the end"]);
        // Starts inside the file, ends past it.
        let bytes = one_tensor(
            |w| {
                w.tensor("w", &[9], F32_ID, 0);
            },
            32,
        );
        assert_gguf_error(&bytes, &["`w` (36 bytes", "runs past the end"]);
        let bytes = one_tensor(
            |w| {
                w.tensor("w", &[1 << 20, 1 << 20], F32_ID, 0);
            },
            32,
        );
        assert_gguf_error(&bytes, &["`w` (4398046511104 bytes", "runs past the end"]);
        // A tensor exactly at the end is fine.
        let file = open(&one_tensor(
            |w| {
                w.tensor("w", &[8], F32_ID, 0);
            },
            32,
        ))
        .unwrap();
        let info = file.tensor_info("w").unwrap();
        assert_eq!(info.offset + info.size, file.file_len());
    }

    #[test]
    fn misaligned_tensor_offset() {
        let bytes = one_tensor(
            |w| {
                w.tensor("w", &[8], F32_ID, 4);
            },
            64,
        );
        assert_gguf_error(&bytes, &["`w` at data offset 4 is not aligned to 32"]);
    }

    #[test]
    fn bad_dimensions() {
        let bytes = one_tensor(
            |w| {
                w.tensor("w", &[4, 0], F32_ID, 0);
            },
            32,
        );
        assert_gguf_error(&bytes, &["`w`: zero dimension in [4, 0]"]);
        let bytes = one_tensor(
            |w| {
                w.tensor("w", &[1, 1, 1, 1, 1], F32_ID, 0);
            },
            32,
        );
        assert_gguf_error(&bytes, &["`w` has 5 dimensions (1..=4 allowed)"]);
        let bytes = one_tensor(
            |w| {
                w.tensor("w", &[], F32_ID, 0);
            },
            32,
        );
        assert_gguf_error(&bytes, &["`w` has 0 dimensions"]);
        // A huge rank is refused before anything is allocated for it.
        let bytes = one_tensor(
            |w| {
                w.str(b"w").u32(u32::MAX).u64(8).u32(F32_ID).u64(0);
            },
            32,
        );
        assert_gguf_error(&bytes, &["`w` has 4294967295 dimensions"]);
        let bytes = one_tensor(
            |w| {
                w.tensor("w", &[1 << 32, 1 << 32, 2], F32_ID, 0);
            },
            32,
        );
        assert_gguf_error(&bytes, &["`w`: dimensions", "overflow"]);
        let bytes = one_tensor(
            |w| {
                w.tensor("w", &[1 << 62], F32_ID, 0);
            },
            32,
        );
        assert_gguf_error(&bytes, &["`w`: byte size", "overflows"]);
        let bytes = one_tensor(
            |w| {
                w.tensor("w", &[16], Q4_0_ID, 0);
            },
            32,
        );
        assert_gguf_error(
            &bytes,
            &["`w`: row of 16 elements is not a whole number of Q4_0 blocks"],
        );
    }

    #[test]
    fn duplicate_tensor_names() {
        let bytes = {
            let mut w = W::default();
            w.header(3, 2, 0)
                .tensor("w", &[8], F32_ID, 0)
                .tensor("w", &[8], F32_ID, 32)
                .pad(32)
                .raw(&[0; 64]);
            w.buf
        };
        assert_gguf_error(&bytes, &["duplicate tensor name `w`"]);
    }

    fn with_alignment(alignment: &Value, offset: u64) -> Vec<u8> {
        let mut w = W::default();
        w.header(3, 1, 1)
            .kv(KEY_ALIGNMENT, alignment)
            .tensor("w", &[8], F32_ID, offset);
        let a = match alignment {
            Value::U32(a) if a.is_power_of_two() => *a as usize,
            _ => 32,
        };
        w.pad(a).raw(&vec![0u8; offset as usize]);
        for i in 0..8 {
            w.raw(&(i as f32 * 1.5).to_le_bytes());
        }
        w.buf
    }

    #[test]
    fn alignment_values() {
        for a in [0, 3, 48, u32::MAX] {
            let bytes = with_alignment(&Value::U32(a), 0);
            assert_gguf_error(&bytes, &["`general.alignment` is", "not a power of two"]);
        }
        for v in [Value::I32(32), Value::U64(32), Value::String("32".into())] {
            assert_gguf_error(
                &with_alignment(&v, 0),
                &["`general.alignment` must be a u32"],
            );
        }
        for (a, offset) in [(1, 3), (8, 8), (64, 128), (1 << 12, 1 << 12)] {
            let file = open(&with_alignment(&Value::U32(a), offset)).unwrap();
            assert_eq!(file.alignment, a as u64);
            let info = file.tensor_info("w").unwrap();
            assert_eq!(info.offset % a as u64, 0);
            assert_eq!(info.offset + info.size, file.file_len());
            // An oddly placed tensor still loads, through an aligned copy.
            let values = crate::quant::load_f32(&file, info).unwrap();
            assert_eq!(values, [0.0, 1.5, 3.0, 4.5, 6.0, 7.5, 9.0, 10.5]);
        }
        let bytes = with_alignment(&Value::U32(64), 32);
        assert_gguf_error(&bytes, &["data offset 32 is not aligned to 64"]);
    }

    #[test]
    fn metadata_only_files_need_no_data_section() {
        let mut w = W::default();
        w.header(3, 0, 1)
            .kv("general.architecture", &Value::String("llama".into()));
        let file = open(&w.buf).unwrap();
        assert!(file.tensors.is_empty());
        assert_eq!(file.get_str("general.architecture").unwrap(), "llama");
        // With a tensor, the padding up to the data section must be there.
        let mut bytes = one_tensor(
            |w| {
                w.tensor("w", &[8], F32_ID, 0);
            },
            32,
        );
        bytes.truncate(bytes.len() - 33);
        assert_gguf_error(
            &bytes,
            &[
                "truncated: file ends at",
                "before the tensor data section at 64",
            ],
        );
    }

    #[test]
    fn tensor_bytes_rechecks_foreign_infos() {
        let file = open(&sample_file(3)).unwrap();
        let mut info = file.tensor_info("b").unwrap().clone();
        info.size += 1;
        assert!(matches!(
            file.tensor_bytes(&info),
            Err(Error::Tensor { .. })
        ));
        info.offset = u64::MAX;
        assert!(matches!(
            file.tensor_bytes(&info),
            Err(Error::Tensor { .. })
        ));
    }
}
