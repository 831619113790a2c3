//! The machine's memory read bandwidth, the ceiling of decode speed, and how much of a model a
//! decode step reads.
//!
//! Decoding one token reads every weight of every layer and the output head once: at batch one
//! there is nothing to reuse, so a step cannot finish before the memory has delivered those bytes.
//! The probe measures the rate at which this machine delivers them to the benchmark's compute
//! threads: like STREAM's read kernel, each thread of the pool sums its share of a buffer much
//! larger than any cache (XOR of 64-bit words, eight independent chains so that the loads and
//! not the adds set the pace), and the best of a few passes counts.

use std::time::Instant;

use rayon::prelude::*;
use realm_common::gguf::GgufFile;
use realm_common::model::ModelConfig;

/// Bytes the probe reads per pass: far beyond the last-level cache of any server CPU.
const PROBE_BYTES: usize = 512 << 20;
/// Passes timed; the first also brings the pages in from the allocator and is not counted.
const PASSES: usize = 5;

/// Bytes per second the compute threads (rayon's pool) read from memory.
pub fn read_bandwidth() -> f64 {
    let words = vec![0x9E37_79B9_7F4A_7C15u64; PROBE_BYTES / 8];
    let share = words.len().div_ceil(rayon::current_num_threads());
    let mut best = f64::INFINITY;
    for pass in 0..=PASSES {
        let start = Instant::now();
        let folded = words.par_chunks(share).map(fold).reduce(|| 0, |a, b| a ^ b);
        std::hint::black_box(folded);
        if pass > 0 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    PROBE_BYTES as f64 / best
}

/// XOR of all of `words`, in eight chains.
fn fold(words: &[u64]) -> u64 {
    let mut chains = [0u64; 8];
    let mut blocks = words.chunks_exact(8);
    for block in &mut blocks {
        for (c, w) in chains.iter_mut().zip(block) {
            *c ^= w;
        }
    }
    let rest = blocks.remainder().iter().fold(0, |a, w| a ^ w);
    chains.iter().fold(rest, |a, c| a ^ c)
}

/// Bytes of weights one decode step reads: every tensor of the layers (of a mixture of experts,
/// only the share of the experts a token uses), the output head (the embedding table where it is
/// tied) and its norm. The embedding lookup reads one row, which is left out.
pub fn decode_step_bytes(file: &GgufFile, config: &ModelConfig) -> u64 {
    let expert_share = config
        .experts
        .as_ref()
        .map_or(1.0, |e| e.used as f64 / e.count.max(1) as f64);
    let head = if file.tensors.contains_key("output.weight") {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    file.tensors
        .values()
        .map(|t| {
            if t.name.starts_with("blk.") {
                if t.name.contains("_exps.") {
                    (t.size as f64 * expert_share) as u64
                } else {
                    t.size
                }
            } else if t.name == head || t.name.starts_with("output_norm.") {
                t.size
            } else {
                0
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fold_reads_every_word() {
        let words: Vec<u64> = (1..=37).map(|i| i * 0x1234_5678).collect();
        let expected = words.iter().fold(0, |a, w| a ^ w);
        assert_eq!(fold(&words), expected);
        assert_eq!(fold(&[]), 0);
    }

    #[test]
    fn a_decode_step_reads_the_layers_and_the_head() {
        use realm_common::synthetic::{self, SyntheticDType, SyntheticSpec};
        let path = std::env::temp_dir().join(format!("realm-step-{}.gguf", std::process::id()));
        synthetic::write(&path, &SyntheticSpec::small(3, 64, SyntheticDType::Q8_0)).expect("write");
        let file = GgufFile::open(&path).expect("open");
        let config = ModelConfig::from_gguf(&file).expect("config");
        let all: u64 = file.tensors.values().map(|t| t.size).sum();
        let embedding = file.tensors["token_embd.weight"].size;
        let layers: u64 = file
            .tensors
            .values()
            .filter(|t| t.name.starts_with("blk."))
            .map(|t| t.size)
            .sum();
        let step = decode_step_bytes(&file, &config);
        if file.tensors.contains_key("output.weight") {
            assert_eq!(step, all - embedding, "everything but the embedding table");
        } else {
            assert_eq!(step, all, "the tied table is the head");
        }
        assert!(step > layers);
        std::fs::remove_file(&path).ok();
    }
}
