//! The machine's memory read bandwidth, the ceiling of decode speed: decoding one token reads
//! every weight of every layer and the output head once (`model::decode_step_bytes`), and at
//! batch one there is nothing to reuse, so a step cannot finish before the memory has delivered
//! those bytes.
//!
//! The probe measures the rate at which this machine delivers them to the benchmark's compute
//! threads: like STREAM's read kernel, each thread of the pool sums its share of a buffer much
//! larger than any cache (XOR of 64-bit words, eight independent chains so that the loads and
//! not the adds set the pace), and the best of a few passes counts.

use std::time::Instant;

use rayon::prelude::*;

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
}
