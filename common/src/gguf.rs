//! GGUF reader (versions 2 and 3).
//!
//! The header is parsed from a read-only memory map; tensor data is never copied here. Nothing in
//! the header is trusted: every count, length and offset is checked against the bytes that remain
//! before anything is allocated or sliced, so a truncated or hostile file yields an [`Error::Gguf`]
//! naming the field and offset, never a panic or an allocation the file cannot back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::mmap::MappedFile;
use crate::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays nest in principle; real files use one level. Bounding the depth bounds recursion.
const MAX_ARRAY_DEPTH: usize = 4;
const KEY_ALIGNMENT: &str = "general.alignment";

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

    /// The value as a signed integer, if it is an integer of any width.
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

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
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
    /// Absolute byte offset in the file; checked to lie, with `size`, inside the file.
    pub offset: u64,
    pub size: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An opened GGUF file: its metadata, its tensor directory and the mapped bytes behind them.
#[derive(Debug, Clone)]
pub struct GgufFile {
    path: PathBuf,
    map: Arc<MappedFile>,
    pub version: u32,
    pub alignment: u64,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let map = Arc::new(MappedFile::open(path)?);
        let header = Header::parse(map.bytes())
            .map_err(|e| Error::Gguf(format!("{}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            version: header.version,
            alignment: header.alignment,
            metadata: header.metadata,
            tensors: header.tensors,
        })
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
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        // In range by construction: `Header::parse` checked offset + size against the file.
        &self.map.bytes()[info.offset as usize..(info.offset + info.size) as usize]
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
        let i = v
            .as_i64()
            .ok_or_else(|| Self::wrong_type(key, "integer", v))?;
        usize::try_from(i).map_err(|_| Error::Metadata {
            key: key.to_string(),
            problem: format!("{i} is not a valid count"),
        })
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
            .map(|v| v.as_str().ok_or_else(|| Self::wrong_type(key, "array of strings", v)))
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
            .map(|v| v.as_i64().ok_or_else(|| Self::wrong_type(key, "array of integers", v)))
            .collect()
    }
}

/// The parsed header, before it is tied to a file.
struct Header {
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, Value>,
    tensors: BTreeMap<String, TensorInfo>,
}

impl Header {
    fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut r = Reader { bytes, pos: 0 };
        let magic = r.take(4, "magic")?;
        if magic != MAGIC {
            return Err(format!("bad magic {magic:02x?}, expected \"GGUF\""));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(format!("unsupported GGUF version {version} (Realm reads 2 and 3)"));
        }
        let tensor_count = r.u64("tensor count")?;
        let kv_count = r.u64("metadata count")?;
        // The smallest key/value is an 8-byte length, a 1-byte key, a type and a 1-byte value; the
        // smallest tensor info is a length, a 1-byte name, n_dims, one dim, a type and an offset.
        r.check_count(kv_count, 8 + 1 + 4 + 1, "metadata count")?;
        r.check_count(tensor_count, 8 + 1 + 4 + 8 + 4 + 8, "tensor count")?;

        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.string(&format!("key of metadata entry {i}"))?;
            let ty = r.u32(&format!("type of `{key}`"))?;
            let value = r.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(format!("duplicate metadata key `{key}`"));
            }
        }

        let alignment = match metadata.get(KEY_ALIGNMENT) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_i64() {
                Some(a) if a > 0 && (a as u64).is_power_of_two() => a as u64,
                _ => return Err(format!("`{KEY_ALIGNMENT}` is {v:?}, not a power of two")),
            },
        };

        let mut infos = Vec::new();
        for i in 0..tensor_count {
            let name = r.string(&format!("name of tensor {i}"))?;
            let n_dims = r.u32(&format!("dimension count of `{name}`"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!("tensor `{name}` has {n_dims} dimensions (1..={MAX_DIMS} allowed)"));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(r.u64(&format!("dimension {d} of `{name}`"))?);
            }
            let type_id = r.u32(&format!("type of `{name}`"))?;
            let dtype = GgmlType::from_id(type_id)
                .ok_or_else(|| format!("tensor `{name}` has unknown or unsupported ggml type id {type_id}"))?;
            let offset = r.u64(&format!("offset of `{name}`"))?;
            infos.push((name, dims, dtype, offset));
        }

        let data_start = r.pos.next_multiple_of(alignment as usize) as u64;
        let file_len = bytes.len() as u64;
        if data_start > file_len {
            return Err(format!(
                "file ends at {file_len} bytes, before the tensor data section at {data_start}"
            ));
        }
        let mut tensors = BTreeMap::new();
        for (name, dims, dtype, offset) in infos {
            let size = tensor_size(&name, &dims, dtype)?;
            if offset % alignment != 0 {
                return Err(format!(
                    "tensor `{name}` at data offset {offset} is not aligned to {alignment}"
                ));
            }
            let start = data_start
                .checked_add(offset)
                .filter(|s| *s <= file_len)
                .ok_or_else(|| format!("tensor `{name}` starts at data offset {offset}, past the end of the file ({file_len} bytes)"))?;
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
            metadata,
            tensors,
        })
    }
}

/// Bytes of a tensor of `dims` elements of `dtype`, checked for overflow and whole blocks.
fn tensor_size(name: &str, dims: &[u64], dtype: GgmlType) -> std::result::Result<u64, String> {
    let mut elements: u64 = 1;
    for &d in dims {
        if d == 0 {
            return Err(format!("tensor `{name}` has a zero dimension in {dims:?}"));
        }
        elements = elements
            .checked_mul(d)
            .ok_or_else(|| format!("tensor `{name}` dimensions {dims:?} overflow"))?;
    }
    let block = dtype.block_size() as u64;
    if dims[0] % block != 0 {
        return Err(format!(
            "tensor `{name}` row of {} elements is not a whole number of {dtype:?} blocks of {block}",
            dims[0]
        ));
    }
    (elements / block)
        .checked_mul(dtype.type_size() as u64)
        .ok_or_else(|| format!("tensor `{name}` byte size overflows"))
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {}, only {} remain",
                self.pos,
                self.remaining()
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Rejects a count of items that could not fit in the rest of the file even at `min_size`
    /// bytes each, before anything is allocated for them.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> std::result::Result<(), String> {
        if count.saturating_mul(min_size) > self.remaining() as u64 {
            return Err(format!(
                "{what} {count} is impossible: only {} bytes remain at offset {}",
                self.remaining(),
                self.pos
            ));
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let at = self.pos;
        let len = self.u64(what)?;
        self.check_count(len, 1, &format!("length of {what}"))?;
        let raw = self.take(len as usize, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| format!("{what} at offset {at} is not valid UTF-8"))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> std::result::Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(key)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("`{key}` holds bool byte {b}, not 0 or 1")),
            },
            8 => Value::String(self.string(&format!("value of `{key}`"))?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("`{key}` nests arrays deeper than {MAX_ARRAY_DEPTH}"));
                }
                let elem_ty = self.u32(&format!("element type of `{key}`"))?;
                let count = self.u64(&format!("length of `{key}`"))?;
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4 | 5 | 6 => 4,
                    8 | 10 | 11 | 12 => 8,
                    9 => 12,
                    other => return Err(format!("`{key}` has unknown array element type {other}")),
                };
                self.check_count(count, min_size, &format!("length of `{key}`"))?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(format!("`{key}` has unknown value type {other}")),
        })
    }
}
