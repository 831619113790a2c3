//! Realm's GGUF reader against the two project models, and against damaged copies of them: both
//! open with the expected metadata and tensor directory, every tensor loads, and every
//! damage is a clear `Error::Gguf`, never a panic.

use std::collections::HashMap;
use std::io::Write;

use realm_common::gguf::{GgufFile, TensorInfo};
use realm_common::model::ModelConfig;
use realm_common::quant::{load_f32, load_qtensor, GgmlType};
use realm_common::Error;
use realm_tests::{model_path, GEMMA3, SMOLLM2};

fn open(name: &str) -> GgufFile {
    GgufFile::open(model_path(name)).unwrap()
}

fn type_counts(file: &GgufFile) -> HashMap<GgmlType, usize> {
    let mut counts = HashMap::new();
    for info in file.tensors.values() {
        *counts.entry(info.dtype).or_default() += 1;
    }
    counts
}

#[test]
fn smollm2_metadata() {
    let file = open(SMOLLM2);
    assert_eq!((file.version, file.alignment), (3, 32));
    assert_eq!(file.metadata.len(), 33);
    assert_eq!(file.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(file.get_usize("llama.block_count").unwrap(), 30);
    assert_eq!(file.get_usize("llama.embedding_length").unwrap(), 576);
    assert_eq!(file.get_usize("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(file.get_usize("llama.attention.head_count").unwrap(), 9);
    assert_eq!(file.get_usize("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(file.get_usize("llama.context_length").unwrap(), 8192);
    assert_eq!(file.get_f32("llama.rope.freq_base").unwrap(), 100_000.0);
    assert_eq!(
        file.get_f32("llama.attention.layer_norm_rms_epsilon")
            .unwrap(),
        1e-5
    );
    assert_eq!(file.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert!(!file.get_bool("tokenizer.ggml.add_bos_token").unwrap());
    assert_eq!(
        file.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    assert_eq!(
        file.get_str_array("tokenizer.ggml.merges").unwrap().len(),
        48900
    );
    assert_eq!(
        file.get_i64_array("tokenizer.ggml.token_type")
            .unwrap()
            .len(),
        49152
    );
    assert!(file
        .get_str("tokenizer.chat_template")
        .unwrap()
        .contains("messages"));

    assert_eq!(file.tensors.len(), 272);
    let want = HashMap::from([
        (GgmlType::F32, 61),
        (GgmlType::Q4_1, 210),
        (GgmlType::Q8_0, 1),
    ]);
    assert_eq!(type_counts(&file), want);
    let embd = file.tensor_info("token_embd.weight").unwrap();
    assert_eq!(
        (embd.dims.as_slice(), embd.dtype),
        (&[576, 49152][..], GgmlType::Q8_0)
    );
    assert_eq!(embd.offset, 1_785_664);
    let down = file.tensor_info("blk.0.ffn_down.weight").unwrap();
    assert_eq!(
        (down.dims.as_slice(), down.dtype),
        (&[1536, 576][..], GgmlType::Q4_1)
    );
}

#[test]
fn gemma3_metadata() {
    let file = open(GEMMA3);
    assert_eq!((file.version, file.alignment), (3, 32));
    assert_eq!(file.metadata.len(), 33);
    assert_eq!(file.get_str("general.architecture").unwrap(), "gemma3");
    assert_eq!(file.get_usize("gemma3.block_count").unwrap(), 18);
    assert_eq!(file.get_usize("gemma3.embedding_length").unwrap(), 640);
    assert_eq!(file.get_usize("gemma3.attention.head_count").unwrap(), 4);
    assert_eq!(file.get_usize("gemma3.attention.head_count_kv").unwrap(), 1);
    assert_eq!(file.get_usize("gemma3.attention.key_length").unwrap(), 256);
    assert_eq!(
        file.get_usize("gemma3.attention.sliding_window").unwrap(),
        512
    );
    assert_eq!(file.get_f32("gemma3.rope.freq_base").unwrap(), 1_000_000.0);
    assert_eq!(file.get_str("tokenizer.ggml.model").unwrap(), "llama");
    assert!(file.get_bool("tokenizer.ggml.add_bos_token").unwrap());
    assert_eq!(
        file.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        262_144
    );
    assert_eq!(
        file.get_f32_array("tokenizer.ggml.scores").unwrap().len(),
        262_144
    );
    assert_eq!(
        file.get_i64_array("tokenizer.ggml.token_type")
            .unwrap()
            .len(),
        262_144
    );

    assert_eq!(file.tensors.len(), 236);
    let want = HashMap::from([
        (GgmlType::F32, 109),
        (GgmlType::Q5_0, 81),
        (GgmlType::Q4K, 27),
        (GgmlType::Q6K, 9),
        (GgmlType::Q8_0, 10),
    ]);
    assert_eq!(type_counts(&file), want);
    let embd = file.tensor_info("token_embd.weight").unwrap();
    assert_eq!(
        (embd.dims.as_slice(), embd.dtype),
        (&[640, 262_144][..], GgmlType::Q8_0)
    );
}

/// Every tensor lies in the file, aligned, sized by its type, without overlapping another; the
/// data section is used up to its last byte.
/// A worker's view of a file: everything but the vocabulary's tokens, scores, types and merges,
/// which no block reads; the same header, tensors and model configuration.
#[test]
fn a_file_opens_without_its_vocabulary() {
    for name in [SMOLLM2, GEMMA3] {
        let full = open(name);
        let blocks = GgufFile::open_without_vocabulary(model_path(name)).unwrap();
        assert!(full.get("tokenizer.ggml.tokens").is_some());
        assert!(blocks.get("tokenizer.ggml.tokens").is_none(), "{name}");
        assert!(blocks.get("tokenizer.ggml.scores").is_none());
        assert!(blocks.get("tokenizer.ggml.merges").is_none());
        let kept: Vec<&String> = full
            .metadata
            .keys()
            .filter(|k| blocks.metadata.contains_key(*k))
            .collect();
        assert!(kept.len() >= full.metadata.len() - 4, "{name}: {kept:?}");
        assert_eq!(blocks.header_sha256(), full.header_sha256());
        assert_eq!(blocks.tensors, full.tensors);
        assert_eq!(
            format!("{:?}", ModelConfig::from_gguf(&blocks).unwrap()),
            format!("{:?}", ModelConfig::from_gguf(&full).unwrap())
        );
    }
}

#[test]
fn tensor_bytes_in_range() {
    for name in [SMOLLM2, GEMMA3] {
        let file = open(name);
        let mut infos: Vec<&TensorInfo> = file.tensors.values().collect();
        infos.sort_by_key(|info| info.offset);
        for pair in infos.windows(2) {
            assert!(
                pair[0].offset + pair[0].size <= pair[1].offset,
                "{name}: `{}` overlaps `{}`",
                pair[0].name,
                pair[1].name
            );
        }
        for info in &infos {
            assert_eq!(info.offset % file.alignment, 0, "{name}: `{}`", info.name);
            assert_eq!(Ok(info.size), info.dtype.checked_size(&info.dims));
            assert_eq!(file.tensor_bytes(info).unwrap().len() as u64, info.size);
        }
        let last = infos.last().unwrap();
        assert_eq!(last.offset + last.size, file.file_len(), "{name}");
    }
}

#[test]
fn every_tensor_loads() {
    for name in [SMOLLM2, GEMMA3] {
        let file = open(name);
        for info in file.tensors.values() {
            let t = load_qtensor(&file, info)
                .unwrap_or_else(|e| panic!("{name}: `{}`: {e}", info.name));
            let shape: Vec<u64> = t.shape().dims().iter().rev().map(|&d| d as u64).collect();
            assert_eq!(shape, info.dims, "{name}: `{}`", info.name);
            assert_eq!(t.dtype().type_size(), info.dtype.type_size());
            assert_eq!(t.storage_size_in_bytes() as u64, info.size);
        }
    }
}

/// Decodes a few tensors of every type completely: all finite, not all zero.
#[test]
fn tensors_of_every_type_decode_to_finite_values() {
    for name in [SMOLLM2, GEMMA3] {
        let file = open(name);
        let mut seen = HashMap::new();
        for info in file.tensors.values() {
            let n = seen.entry(info.dtype).or_insert(0);
            if *n == 2 || info.name == "token_embd.weight" {
                continue;
            }
            *n += 1;
            let values = load_f32(&file, info).unwrap();
            assert!(
                values.iter().all(|v| v.is_finite()),
                "{name}: `{}`",
                info.name
            );
            assert!(values.iter().any(|&v| v != 0.0), "{name}: `{}`", info.name);
        }
    }
}

/// Writes `bytes` to a temporary file and returns the message of the `Error::Gguf` opening it
/// must give.
fn gguf_error(bytes: &[u8]) -> String {
    let mut tmp = tempfile::NamedTempFile::new().unwrap();
    tmp.write_all(bytes).unwrap();
    tmp.flush().unwrap();
    match GgufFile::open(tmp.path()) {
        Err(Error::Gguf(msg)) => {
            assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
            msg
        }
        Err(other) => panic!("expected a GGUF error, got {other}"),
        Ok(_) => panic!("a damaged file was accepted"),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
}

/// Byte position of the info record of tensor `name`: its name (as a GGUF string) comes first.
fn info_position(bytes: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    find(bytes, &needle)
}

#[test]
fn truncated_model_is_a_clear_error() {
    let bytes = std::fs::read(model_path(SMOLLM2)).unwrap();
    let file = open(SMOLLM2);
    let infos_start = info_position(&bytes, "token_embd.weight");
    let data_start = file.tensor_info("token_embd.weight").unwrap().offset as usize;
    let cuts = [
        // The fixed header, the metadata (inside the vocabulary).
        (0, "truncated"),
        (3, "truncated"),
        (10, "truncated"),
        (20, "truncated: metadata count"),
        (24, "tensor count is 272, more than"),
        (4096, "tensor count is 272, more than"),
        (
            100_000,
            "length of `tokenizer.ggml.tokens` is 49152, more than",
        ),
        (500_000, "`tokenizer.ggml."),
        (infos_start - 1, "truncated"),
        (infos_start, "tensor count is 272, more than"),
        // The tensor infos, the padding before the data.
        (infos_start + 100, "tensor count is 272, more than"),
        (infos_start + 9000, "name of tensor 151"),
        (data_start - 1, "truncated"),
        // The data.
        (data_start, "past the end"),
        (data_start + 12_345, "runs past the end"),
        (bytes.len() / 2, "runs past the end"),
        (bytes.len() - 1, "runs past the end"),
    ];
    for (len, needle) in cuts {
        let msg = gguf_error(&bytes[..len]);
        assert!(msg.contains(needle), "cut at {len}: {msg}");
    }
}

#[test]
fn damaged_model_is_a_clear_error() {
    let bytes = std::fs::read(model_path(SMOLLM2)).unwrap();

    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(gguf_error(&bad).contains("bad magic"));

    let mut bad = bytes.clone();
    bad[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(gguf_error(&bad).contains("unsupported GGUF version 1"));

    // `output_norm.weight`: name, rank 1, one dimension, type, then the offset.
    let name = "output_norm.weight";
    let at = info_position(&bytes, name) + 8 + name.len();
    let (dim_at, type_at, offset_at) = (at + 4, at + 12, at + 16);
    let patched = |pos: usize, value: &[u8]| {
        let mut bad = bytes.clone();
        bad[pos..pos + value.len()].copy_from_slice(value);
        gguf_error(&bad)
    };
    let msg = patched(offset_at, &(1u64 << 40).to_le_bytes());
    assert!(
        msg.contains("`output_norm.weight` starts at data offset 1099511627776"),
        "{msg}"
    );
    assert!(msg.contains("past the end"), "{msg}");
    let msg = patched(offset_at, &(u64::MAX - 31).to_le_bytes());
    assert!(msg.contains("past the end"), "{msg}");
    let msg = patched(offset_at, &7u64.to_le_bytes());
    assert!(msg.contains("not aligned to 32"), "{msg}");
    let msg = patched(dim_at, &(1u64 << 30).to_le_bytes());
    assert!(
        msg.contains("`output_norm.weight` (4294967296 bytes"),
        "{msg}"
    );
    assert!(msg.contains("runs past the end"), "{msg}");
    let msg = patched(dim_at, &0u64.to_le_bytes());
    assert!(msg.contains("zero dimension"), "{msg}");
    let msg = patched(type_at, &99u32.to_le_bytes());
    assert!(
        msg.contains("unknown or unsupported ggml type id 99"),
        "{msg}"
    );
    let msg = patched(at, &9u32.to_le_bytes());
    assert!(msg.contains("has 9 dimensions"), "{msg}");
}
