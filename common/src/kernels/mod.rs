//! Quantized matrix × activation products computed by Realm itself, and the inner loops of
//! attention.
//!
//! Activations are quantized to 8 bits per 32-value block (`Q8_0`, or `Q8_1` which also carries
//! the block's scaled sum), then each weight row is dotted with them in integers and scaled
//! once per block. The rounding of activations (ties to even), the per-block scale products and
//! the eight-lane accumulation order follow the de-facto reference numerics of GGUF engines, so
//! greedy decoding agrees with them token for token even where two candidates nearly tie.
//!
//! Matrices whose rows come in whole groups of eight, in the 4-bit 32-value formats, are
//! repacked at load with their rows interleaved (see [`interleaved`]), which changes how the
//! integers are grouped before scaling for `Q4_0` and `Q4_1` (one total per block). On AVX-512
//! VNNI, groups of sixteen rows take one row per 32-bit lane instead (`wide`), the K formats'
//! too.
//!
//! The K formats (`Q4_K`, `Q6_K`) work on super-blocks of 256 values: activations are quantized
//! to `Q8_K` (one f32 scale per 256 values, and the sums of each 16 quants so that a weight
//! block's minimum or offset costs one integer product per sub-block). Every sub-block scale is
//! applied in integers, and each super-block's integer total is scaled into one f32 accumulator
//! with one fused multiply-add (minimums into a second one, subtracted at the end). Of the
//! accumulation orders tried, this one agrees best with the reference engine's output on gemma3
//! (63 of 64 teacher-forced tokens, against 60 with eight lanes per row).
//!
//! Every kernel has a portable version, which defines the bits of the results, and SIMD
//! versions chosen at run time by what the CPU has: AVX2 and AVX-512 VNNI on x86-64, NEON on
//! aarch64 (with the dot product extension where the CPU has it). They group the integer sums
//! as suits them (integers are exact) but do every f32 operation of the portable code, in the
//! same order with the same rounding, so every path computes the same bits.
//!
//! Formats without a kernel here fall back to candle's (see the CPU backend,
//! `model::backend::cpu`).
//!
//! The files follow that design:
//! - this one: [`QMatrix`], its storage and layouts, its products spread over the threads, and
//!   the choice of each kernel by the [`Isa`] the matrix was built for;
//! - [`isa`]: the instruction set, detected once and handed down;
//! - [`portable`]: the kernels that define the bits;
//! - [`interleaved`] and `wide`: the layouts matrices are repacked into at load;
//! - `x86` and `neon`: the SIMD versions, the crate's only `unsafe` code besides file mapping;
//! - [`attention`]: attention's query–key scores and softmax-weighted value sums.

use std::sync::Arc;

use rayon::prelude::*;

use crate::gguf::TensorData;
use crate::mmap::WeightBytes;
use crate::quant::GgmlType;

pub(crate) mod attention;
mod interleaved;
mod isa;
#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
mod neon;
mod portable;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod wide;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86;

pub use interleaved::repacks;
pub(crate) use isa::Isa;
#[cfg(target_arch = "x86_64")]
use isa::X86;

const QK: usize = 32;
/// Values in a K-format super-block and in a `Q8_K` activation block.
const QK_K: usize = 256;
/// Accumulator lanes: each lane sums four adjacent products of a 32-value block.
const LANES: usize = 8;

/// Weight formats with a kernel here.
pub fn supported(dtype: GgmlType) -> bool {
    matches!(
        dtype,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q8_0
            | GgmlType::Q4K
            | GgmlType::Q6K
    )
}

/// Whether a `[rows, cols]` matrix of `dtype` has a kernel here: its rows must be whole blocks
/// (a K-format tensor narrower than a super-block is stored in another format anyway).
pub fn supported_shape(dtype: GgmlType, cols: usize) -> bool {
    supported(dtype) && cols.is_multiple_of(dtype.block_size())
}

/// K formats pair with `Q8_K` activations, the others with `Q8_0`/`Q8_1`.
fn is_k(dtype: GgmlType) -> bool {
    matches!(dtype, GgmlType::Q4K | GgmlType::Q6K)
}

/// One activation block: 32 signed 8-bit values, their scale, (`Q8_1`) scale × sum, their sum
/// (for kernels that store quants with an offset), and for the kernels that need them
/// ([`interleaved::prepare`]) minus 16 × each lane's sum (`Q5_0`'s offset, added to each lane's
/// integer); zeros otherwise.
#[derive(Debug, Clone, Copy, Default)]
struct ActBlock {
    d: f32,
    s: f32,
    sum: i32,
    lane_bias: [i32; LANES],
    qs: [i8; QK],
}

/// One `Q8_K` activation block: 256 signed 8-bit values in eight 32-value groups, their f32
/// scale, and the sum of each 16 consecutive quants.
#[derive(Debug, Clone, Copy)]
struct KBlock {
    d: f32,
    qs: [[i8; QK]; QK_K / QK],
    bsums: [i16; QK_K / 16],
}

/// A quantized weight matrix `[rows, cols]`: in the file's layout (row-major, ggml blocks), or
/// repacked into groups of rows (see [`Layout`]), computed on the [`Isa`] it was built for.
#[derive(Debug, Clone)]
pub struct QMatrix {
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    isa: Isa,
    layout: Layout,
    data: Storage,
}

/// How a matrix's rows are laid out in its bytes; each layout has its kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// The file's: row after row, each a run of ggml blocks.
    File,
    /// Groups of [`interleaved::ROWS`] rows interleaved block by block.
    Interleaved,
    /// Groups of [`wide::ROWS`] rows for AVX-512 VNNI, which this CPU runs.
    #[cfg(target_arch = "x86_64")]
    Wide(X86),
}

impl Layout {
    /// The layout of a `[rows, _]` matrix of `dtype` computed on `isa`.
    fn of(isa: Isa, dtype: GgmlType, rows: usize) -> Self {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::X86(cpu) if cpu.avx512() && wide::repacks(dtype, rows) => Self::Wide(cpu),
            _ if repacks(dtype, rows) => Self::Interleaved,
            _ => Self::File,
        }
    }

    /// Rows of one group of a repacked layout; `None` for the file's.
    fn group_rows(self) -> Option<usize> {
        match self {
            Self::File => None,
            Self::Interleaved => Some(interleaved::ROWS),
            #[cfg(target_arch = "x86_64")]
            Self::Wide(_) => Some(wide::ROWS),
        }
    }

    /// Copies `bytes` (rows of `row_bytes` in the file's layout) into `out` in this layout (the
    /// file's: as they are), telling `done(n)` as it goes that the first `n` bytes of `bytes`
    /// will not be read again.
    fn repack(
        self,
        dtype: GgmlType,
        row_bytes: usize,
        bytes: &[u8],
        out: &mut [u8],
        mut done: impl FnMut(usize),
    ) {
        match self {
            Self::File => {
                const PIECE: usize = 1 << 20;
                for (i, (to, from)) in out.chunks_mut(PIECE).zip(bytes.chunks(PIECE)).enumerate() {
                    to.copy_from_slice(from);
                    done(i * PIECE + from.len());
                }
            }
            Self::Interleaved => interleaved::repack(dtype, row_bytes, bytes, out, done),
            #[cfg(target_arch = "x86_64")]
            Self::Wide(_) => wide::repack(dtype, row_bytes, bytes, out, done),
        }
    }
}

/// Walks `bytes` (a matrix in the file's layout, `row_bytes` per row, whole groups of `ROWS`
/// rows) for a repacking into `out` (as long as `bytes`): calls `each(blocks, group_block)` for
/// each group and column of blocks, `blocks[i]` being row `i`'s block and `group_block` the
/// `ROWS` blocks' bytes of `out` that take them. Tells `done(n)`, every few hundred KiB, that
/// the first `n` bytes of `bytes` will not be read again.
fn repack_groups<const ROWS: usize>(
    dtype: GgmlType,
    row_bytes: usize,
    bytes: &[u8],
    out: &mut [u8],
    mut done: impl FnMut(usize),
    mut each: impl FnMut(&[&[u8]; ROWS], &mut [u8]),
) {
    const REPORT_EVERY: usize = 256 << 10;
    let (block, group_len) = (dtype.type_size(), ROWS * row_bytes);
    assert_eq!(
        out.len(),
        bytes.len(),
        "a repacked copy has the original's size"
    );
    assert!(
        bytes.len().is_multiple_of(group_len),
        "whole groups of rows"
    );
    let mut reported = 0;
    for (g, (group, to)) in bytes
        .chunks_exact(group_len)
        .zip(out.chunks_exact_mut(group_len))
        .enumerate()
    {
        let consumed = g * group_len;
        if consumed >= reported + REPORT_EVERY {
            done(consumed);
            reported = consumed;
        }
        for (b, group_block) in to.chunks_exact_mut(ROWS * block).enumerate() {
            let blocks = std::array::from_fn(|i| &group[i * row_bytes + b * block..][..block]);
            each(&blocks, group_block);
        }
    }
    done(bytes.len());
}

/// Where a matrix's bytes live. Clones share the bytes.
#[derive(Debug, Clone)]
enum Storage {
    /// A copy, in the file's layout or another, in the weight arena (huge pages where the OS
    /// gives them).
    Copied(Arc<WeightBytes>),
    /// The mapped model file itself.
    Mapped(TensorData),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Copied(v) => v,
            Self::Mapped(t) => t.bytes(),
        }
    }

    /// A copy of `bytes` (rows of `row_bytes` in the file's layout) in `layout`, `done(n)` told
    /// as it goes that the first `n` bytes of `bytes` will not be read again.
    fn copy(
        layout: Layout,
        dtype: GgmlType,
        row_bytes: usize,
        bytes: &[u8],
        done: impl FnMut(usize),
    ) -> Option<Self> {
        let copy = WeightBytes::new(bytes.len(), |copy| {
            layout.repack(dtype, row_bytes, bytes, copy, done);
        });
        Some(Self::Copied(Arc::new(copy.ok()?)))
    }
}

impl QMatrix {
    /// `bytes` hold `rows` rows of `cols` values of `dtype` in the file's layout; `None` unless
    /// `supported_shape(dtype, cols)` and the sizes agree. The matrix keeps a copy, repacked
    /// where [`repacks`] says so.
    pub fn new(dtype: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        Self::new_releasing(dtype, rows, cols, bytes, |_| {})
    }

    /// [`new`](Self::new), telling `done(n)` as it goes that the first `n` bytes of `bytes`
    /// will not be read again: a copy out of a mapped file can give the file's pages back
    /// while it runs, so the copy and the file are never both resident.
    pub fn new_releasing(
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        done: impl FnMut(usize),
    ) -> Option<Self> {
        Self::on(Isa::detect(), dtype, rows, cols, bytes, done)
    }

    /// [`new_releasing`](Self::new_releasing) for computing on `isa`, which decides the layout.
    fn on(
        isa: Isa,
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        done: impl FnMut(usize),
    ) -> Option<Self> {
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        if !supported_shape(dtype, cols) || bytes.len() != rows * row_bytes {
            return None;
        }
        let layout = Layout::of(isa, dtype, rows);
        let data = Storage::copy(layout, dtype, row_bytes, bytes, done)?;
        Self::with_storage(isa, dtype, rows, cols, layout, data)
    }

    /// One matrix of the rows of `parts` in turn (each whole rows of `cols` values of `dtype`,
    /// in the file's layout), repacked straight from them into one copy, no larger than the
    /// parts; `done(i)` hears when part `i` will not be read again. `None` unless the whole
    /// is repacked and every part is whole groups of its layout, so that no group straddles
    /// two parts and each row's products are the bits its part would give alone.
    pub fn stacked(
        dtype: GgmlType,
        cols: usize,
        parts: &[&[u8]],
        mut done: impl FnMut(usize),
    ) -> Option<Self> {
        let isa = Isa::detect();
        if !supported_shape(dtype, cols) {
            return None;
        }
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let rows = len / row_bytes;
        let layout = Layout::of(isa, dtype, rows);
        let group = layout.group_rows()?;
        let whole_groups = |p: &&[u8]| p.len().is_multiple_of(group * row_bytes);
        if !parts.iter().all(whole_groups) {
            return None;
        }
        let copy = WeightBytes::new(len, |copy| {
            let mut at = 0;
            for (i, part) in parts.iter().enumerate() {
                let to = &mut copy[at..at + part.len()];
                layout.repack(dtype, row_bytes, part, to, |_| {});
                at += part.len();
                done(i);
            }
        });
        let data = Storage::Copied(Arc::new(copy.ok()?));
        Self::with_storage(isa, dtype, rows, cols, layout, data)
    }

    /// A matrix computed straight from the mapped model file: no copy is made, and the
    /// process's resident memory holds the weights only while their pages are mapped in.
    pub fn mapped(dtype: GgmlType, rows: usize, cols: usize, data: TensorData) -> Option<Self> {
        let storage = Storage::Mapped(data);
        Self::with_storage(Isa::detect(), dtype, rows, cols, Layout::File, storage)
    }

    /// A copy kept in the file's layout, whatever the format.
    #[cfg(test)]
    fn file_layout_for_test(dtype: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Self {
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let storage = Storage::copy(Layout::File, dtype, row_bytes, bytes, |_| {}).unwrap();
        Self::with_storage(Isa::detect(), dtype, rows, cols, Layout::File, storage).unwrap()
    }

    fn with_storage(
        isa: Isa,
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        layout: Layout,
        data: Storage,
    ) -> Option<Self> {
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let ok = supported_shape(dtype, cols) && data.bytes().len() == rows * row_bytes;
        ok.then_some(Self {
            dtype,
            rows,
            cols,
            row_bytes,
            isa,
            layout,
            data,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `out[t][r] = Σ_c x[t][c] · W[r][c]` for `t < n`; `x` is `[n, cols]`, `out` `[n, rows]`.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        debug_assert_eq!(x.len(), n * self.cols);
        debug_assert_eq!(out.len(), n * self.rows);
        let (isa, dtype, row_bytes) = (self.isa, self.dtype, self.row_bytes);
        match self.layout {
            Layout::File if is_k(dtype) => {
                let acts = self.quantize(x, QK_K, |x, q| quantize_row_k(isa, x, q));
                self.by_rows(&acts, out, |rows, acts, ys| {
                    dot_rows_k(isa, dtype, rows, row_bytes, acts, ys)
                })
            }
            Layout::File => {
                let acts = self.quantize(x, QK, |x, q| quantize_row(isa, x, q));
                self.by_rows(&acts, out, |rows, acts, ys| {
                    dot_rows(isa, dtype, rows, row_bytes, acts, ys)
                })
            }
            Layout::Interleaved => {
                let acts = self.quantize_for_groups(x);
                self.by_groups(&acts, out, interleaved::ROWS, |group, acts, ys| {
                    interleaved_group_matmul(isa, dtype, group, acts, ys)
                })
            }
            #[cfg(target_arch = "x86_64")]
            Layout::Wide(cpu) if is_k(dtype) => {
                let acts = self.quantize(x, QK_K, |x, q| quantize_row_k(isa, x, q));
                self.by_groups(&acts, out, wide::ROWS, |group, acts, ys| {
                    x86::wide_k::group_matmul(cpu, dtype, group, acts, ys)
                })
            }
            #[cfg(target_arch = "x86_64")]
            Layout::Wide(cpu) => {
                let acts = self.quantize_for_groups(x);
                self.by_groups(&acts, out, wide::ROWS, |group, acts, ys| {
                    x86::wide::group_matmul(cpu, dtype, group, acts, ys)
                })
            }
        }
    }

    /// Each token's activations quantized into blocks of `block` values, the tokens of a
    /// prefill spread over the threads.
    fn quantize<A: Send>(
        &self,
        x: &[f32],
        block: usize,
        quantize: impl Fn(&[f32], &mut Vec<A>) + Sync,
    ) -> Vec<Vec<A>> {
        let one = |row: &[f32]| {
            let mut q = Vec::with_capacity(self.cols / block);
            quantize(row, &mut q);
            q
        };
        if x.len() == self.cols {
            return vec![one(x)];
        }
        x.par_chunks_exact(self.cols).map(one).collect()
    }

    /// The activations the grouped layouts take: 32-value blocks, with what their kernels
    /// need beyond the quantization ([`interleaved::prepare`]).
    fn quantize_for_groups(&self, x: &[f32]) -> Vec<Vec<ActBlock>> {
        let mut acts = self.quantize(x, QK, |x, q| quantize_row(self.isa, x, q));
        interleaved::prepare(self.dtype, &mut acts);
        acts
    }

    /// Runs `dot(rows, acts, results)` over slices of the rows in the file's layout, in
    /// parallel: `results[r * n + t]` for the slice's row `r` and token `t`.
    fn by_rows<A: Sync>(
        &self,
        acts: &[Vec<A>],
        out: &mut [f32],
        dot: impl Fn(&[u8], &[Vec<A>], &mut [f32]) + Sync,
    ) {
        let n = acts.len();
        let bytes = self.data.bytes();
        self.run_tasks(n, out, 1, |first, results| {
            let rows = &bytes[first * self.row_bytes..][..results.len() / n * self.row_bytes];
            dot(rows, acts, results)
        })
    }

    /// Runs `group_matmul(group, acts, results)` over the groups of `rows` rows of a grouped
    /// layout, in parallel: `results[t * rows + i]` for the group's row `i` and token `t`.
    fn by_groups<A: Sync>(
        &self,
        acts: &[Vec<A>],
        out: &mut [f32],
        rows: usize,
        group_matmul: impl Fn(&[u8], &[Vec<A>], &mut [f32]) + Sync,
    ) {
        let n = acts.len();
        let (bytes, group_bytes) = (self.data.bytes(), rows * self.row_bytes);
        self.run_tasks(n, out, rows, |first, results| {
            let first = first / rows;
            for (g, ys) in results.chunks_exact_mut(n * rows).enumerate() {
                let group = &bytes[(first + g) * group_bytes..][..group_bytes];
                group_matmul(group, acts, ys);
            }
        })
    }

    /// Runs `task(first_row, results)` in parallel over slices of rows (whole `unit`s of
    /// them); `results` holds the slice's rows for every token (`[rows, n]` within a unit of
    /// one row, `[n, unit]` per unit otherwise), scattered into `out`'s `[n, rows]` afterwards.
    fn run_tasks(
        &self,
        n: usize,
        out: &mut [f32],
        unit: usize,
        task: impl Fn(usize, &mut [f32]) + Sync,
    ) {
        // Enough tasks that both halves of a two-way split stay busy, few enough that each
        // streams a good stretch of the matrix.
        let units = self.rows / unit;
        let tasks = 4 * rayon::current_num_threads();
        let per_task = units.div_ceil(tasks).max(if n == 1 { 1 } else { 2 }) * unit;
        let run = |results: &mut [f32]| {
            results
                .par_chunks_mut(per_task * n)
                .enumerate()
                .for_each(|(i, chunk)| task(i * per_task, chunk))
        };
        if n == 1 {
            // One token (decode): the results' layout is already `out`'s.
            return run(out);
        }
        let mut results = vec![0.0f32; n * self.rows];
        run(&mut results);
        // Each token's row gathered from the units, the tokens spread over the threads.
        out.par_chunks_exact_mut(self.rows)
            .enumerate()
            .for_each(|(t, ys)| match unit {
                1 => {
                    for (y, r) in ys.iter_mut().zip(results[t..].iter().step_by(n)) {
                        *y = *r;
                    }
                }
                unit => {
                    let from = results
                        .chunks_exact(n * unit)
                        .map(|b| &b[t * unit..][..unit]);
                    for (to, from) in ys.chunks_exact_mut(unit).zip(from) {
                        to.copy_from_slice(from);
                    }
                }
            });
    }
}

// Each kernel on an `Isa`: the portable code, or the SIMD path it names.

/// Quantizes one activation row (`len % 32 == 0`) into `Q8_0`/`Q8_1` blocks.
fn quantize_row(isa: Isa, x: &[f32], out: &mut Vec<ActBlock>) {
    match isa {
        Isa::Portable => portable::quantize_row(x, out),
        #[cfg(target_arch = "x86_64")]
        Isa::X86(cpu) => x86::quantize_row(cpu, x, out),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon(cpu) => neon::quantize_row(cpu, x, out),
    }
}

/// Quantizes one activation row (`len % 256 == 0`) into `Q8_K` blocks.
fn quantize_row_k(isa: Isa, x: &[f32], out: &mut Vec<KBlock>) {
    match isa {
        Isa::Portable => portable::quantize_row_k(x, out),
        #[cfg(target_arch = "x86_64")]
        Isa::X86(cpu) => x86::quantize_row_k(cpu, x, out),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon(cpu) => neon::quantize_row_k(cpu, x, out),
    }
}

/// Dots every row of `rows` (the file's layout, 32-value formats) with every token's
/// activations: `out[r * n + t]`.
fn dot_rows(
    isa: Isa,
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<ActBlock>],
    out: &mut [f32],
) {
    match isa {
        Isa::Portable => portable::dot_rows(dtype, rows, row_bytes, acts, out),
        #[cfg(target_arch = "x86_64")]
        Isa::X86(cpu) => x86::rows::dot_rows(cpu, dtype, rows, row_bytes, acts, out),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon(cpu) => neon::rows::dot_rows(cpu, dtype, rows, row_bytes, acts, out),
    }
}

/// [`dot_rows`] for the K formats.
fn dot_rows_k(
    isa: Isa,
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<KBlock>],
    out: &mut [f32],
) {
    match isa {
        Isa::Portable => portable::dot_rows_k(dtype, rows, row_bytes, acts, out),
        #[cfg(target_arch = "x86_64")]
        Isa::X86(cpu) => x86::k::dot_rows_k(cpu, dtype, rows, row_bytes, acts, out),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon(cpu) => neon::k::dot_rows_k(cpu, dtype, rows, row_bytes, acts, out),
    }
}

/// One group of the interleaved layout's products with every token: `out[t * ROWS + i]` for
/// row `i` of the group.
fn interleaved_group_matmul(
    isa: Isa,
    dtype: GgmlType,
    group: &[u8],
    acts: &[Vec<ActBlock>],
    out: &mut [f32],
) {
    match isa {
        Isa::Portable => portable::interleaved_group_matmul(dtype, group, acts, out),
        #[cfg(target_arch = "x86_64")]
        Isa::X86(cpu) => x86::interleaved::group_matmul(cpu, dtype, group, acts, out),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon(cpu) => neon::interleaved::group_matmul(cpu, dtype, group, acts, out),
    }
}
