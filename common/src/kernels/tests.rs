//! The kernels against the dequantized product, and every path this CPU runs, not only the
//! fastest, against the portable code's bits.

use half::f16;

use super::*;
use crate::quant::qtensor_from_bytes;
use candle_core::Device;
use rand::{Rng, SeedableRng};

/// Random rows of `dtype` with sane f16 scales.
fn random_matrix(
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    rng: &mut rand::rngs::StdRng,
) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..rows * cols / dtype.block_size() * dtype.type_size())
        .map(|_| rng.random())
        .collect();
    let mut f16_at = |block: &mut [u8], at: usize, range: std::ops::Range<f32>| {
        let v = f16::from_f32(rng.random_range(range));
        block[at..at + 2].copy_from_slice(&v.to_le_bytes());
    };
    for block in bytes.chunks_exact_mut(dtype.type_size()) {
        match dtype {
            GgmlType::Q4K => {
                f16_at(block, 0, 0.0005..0.002);
                f16_at(block, 2, 0.0005..0.002);
            }
            // Signed 8-bit sub-block scales: a smaller super-block scale.
            GgmlType::Q6K => f16_at(block, 208, 0.00005..0.0002),
            _ => f16_at(block, 0, 0.001..0.02),
        }
        if dtype == GgmlType::Q4_1 {
            f16_at(block, 2, -0.1..0.0);
        }
    }
    bytes
}

/// `x` quantized portably into `Q8_0`/`Q8_1` blocks, after checking that every path this CPU
/// runs gives the same bits.
fn quantized(x: &[f32]) -> Vec<ActBlock> {
    let mut portable = Vec::new();
    portable::quantize_row(x, &mut portable);
    for isa in Isa::every() {
        let mut q = Vec::new();
        quantize_row(isa, x, &mut q);
        assert_eq!(q.len(), portable.len());
        for (a, b) in q.iter().zip(&portable) {
            assert_eq!(
                (a.d.to_bits(), a.s.to_bits(), a.qs),
                (b.d.to_bits(), b.s.to_bits(), b.qs),
                "{isa:?}"
            );
        }
    }
    portable
}

/// [`quantized`] into `Q8_K` blocks.
fn quantized_k(x: &[f32]) -> Vec<KBlock> {
    let mut portable = Vec::new();
    portable::quantize_row_k(x, &mut portable);
    for isa in Isa::every() {
        let mut q = Vec::new();
        quantize_row_k(isa, x, &mut q);
        assert_eq!(q.len(), portable.len());
        for (a, b) in q.iter().zip(&portable) {
            assert_eq!(
                (a.d.to_bits(), a.qs, a.bsums),
                (b.d.to_bits(), b.qs, b.bsums),
                "{isa:?}"
            );
        }
    }
    portable
}

/// The portable product of one row with one token's activations, quantized portably after
/// checking that every path's quantization gives the same bits.
fn portable_dot(dtype: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    match dtype {
        GgmlType::Q4K => portable::dot_q4_k(row, &quantized_k(x)),
        GgmlType::Q6K => portable::dot_q6_k(row, &quantized_k(x)),
        GgmlType::Q4_0 => portable::dot_q4_0(row, &quantized(x)),
        GgmlType::Q4_1 => portable::dot_q4_1(row, &quantized(x)),
        GgmlType::Q5_0 => portable::dot_q5_0(row, &quantized(x)),
        _ => portable::dot_q8_0(row, &quantized(x)),
    }
}

#[test]
fn dispatched_quantization_matches_the_portable_bits() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // Blocks of many magnitudes, ties at .5 steps, an all-zero block and a lone value.
    let mut x: Vec<f32> = (0..64 * QK)
        .map(|i| rng.random_range(-1.0f32..1.0) * 10f32.powi((i / QK) as i32 % 7 - 3))
        .collect();
    x[..QK]
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = i as f32 - 15.5);
    x[QK..2 * QK].fill(0.0);
    x[2 * QK..3 * QK].fill(0.0);
    x[2 * QK + 5] = -3.0;
    quantized(&x);
    // Q8_K too, with a tie for the largest magnitude (the first one counts) in a block.
    x[3 * QK_K + 17] = 50.0;
    x[3 * QK_K + 200] = -50.0;
    x[5 * QK_K..6 * QK_K].fill(0.0);
    quantized_k(&x);
}

/// Checks `got` (`[n, rows]`) against the product of the dequantized weights and the exact
/// activations `x` (`[n, cols]`), within what quantizing the activations can explain.
fn assert_near_dequantized(
    dtype: GgmlType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    got: &[f32],
) {
    let act_block = if is_k(dtype) { QK_K } else { QK };
    let w = qtensor_from_bytes(dtype, bytes, &[cols as u64, rows as u64], &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (t, xs) in x.chunks_exact(cols).enumerate() {
        for (r, w) in w.iter().enumerate() {
            let exact: f32 = w.iter().zip(xs).map(|(w, x)| w * x).sum();
            let g = got[t * rows + r];
            // Each activation is off by at most half a quantization step, amax/254 of its
            // block; the product can be off by that much times each |weight|.
            let bound: f32 = (0..cols)
                .map(|c| {
                    let block = &xs[c / act_block * act_block..][..act_block];
                    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    w[c].abs() * amax / 254.0
                })
                .sum();
            let tolerance = 1.01 * bound + 1e-3;
            assert!(
                (g - exact).abs() < tolerance,
                "{dtype:?} [{t}][{r}]: {g} vs {exact}"
            );
        }
    }
}

#[test]
fn a_repacked_copy_reports_what_it_has_read_in_order_up_to_the_end() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    // Enough groups that the copy reports progress before its end.
    let (rows, cols) = (8 * 64, 4096);
    let bytes = random_matrix(GgmlType::Q8_0, rows, cols, &mut rng);
    let mut reports = Vec::new();
    let m =
        QMatrix::new_releasing(GgmlType::Q8_0, rows, cols, &bytes, |n| reports.push(n)).unwrap();
    assert!(reports.len() > 2, "{reports:?}");
    assert!(reports.windows(2).all(|w| w[0] < w[1]), "{reports:?}");
    assert_eq!(reports.last(), Some(&bytes.len()));
    // The copy computes what the file layout does.
    let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
    let (mut got, mut want) = (vec![0.0; rows], vec![0.0; rows]);
    m.matmul(&x, 1, &mut got);
    QMatrix::file_layout_for_test(GgmlType::Q8_0, rows, cols, &bytes).matmul(&x, 1, &mut want);
    assert_eq!(got, want);
}

#[test]
fn interleaved_kernels_match_the_dequantized_product_and_the_portable_bits() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (rows, cols) = (24, 256);
    // Several tokens in one pass over a group, whole register tiles of them and every leftover
    // count, and more than one pass (17, 33).
    for (dtype, n) in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
    ]
    .into_iter()
    .flat_map(|d| [2, 3, 4, 5, 6, 7, 8, 17, 33].map(|n| (d, n)))
    {
        assert!(repacks(dtype, rows) && !repacks(dtype, rows + 1));
        let bytes = random_matrix(dtype, rows, cols, &mut rng);
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let m = QMatrix::new(dtype, rows, cols, &bytes).unwrap();
        assert_eq!(m.layout, Layout::Interleaved);
        let mut prefill = vec![0.0; n * rows];
        m.matmul(&x, n, &mut prefill);

        assert_near_dequantized(dtype, &bytes, rows, cols, &x, &prefill);
        // Formats that accumulate by lanes compute the file-layout kernels' very bits.
        if interleaved::by_lanes(dtype) {
            let file_layout = QMatrix::file_layout_for_test(dtype, rows, cols, &bytes);
            let mut reference = vec![0.0; n * rows];
            file_layout.matmul(&x, n, &mut reference);
            for (i, (&g, &r)) in prefill.iter().zip(&reference).enumerate() {
                assert_eq!(g.to_bits(), r.to_bits(), "{dtype:?} [{i}]: {g} vs {r}");
            }
        }

        // Decode gives each token the same bits as prefill, and so does the portable code.
        let mut acts = m.quantize(&x, QK, portable::quantize_row);
        interleaved::prepare(dtype, &mut acts);
        let packed = m.data.bytes();
        let group_bytes = interleaved::ROWS * m.row_bytes;
        for (t, xs) in x.chunks_exact(cols).enumerate() {
            let mut decode = vec![0.0; rows];
            m.matmul(xs, 1, &mut decode);
            for (r, &d) in decode.iter().enumerate() {
                assert_eq!(
                    d.to_bits(),
                    prefill[t * rows + r].to_bits(),
                    "{dtype:?} [{t}][{r}]"
                );
            }
        }
        for (g, group) in packed.chunks_exact(group_bytes).enumerate() {
            let mut portable = vec![0.0; n * interleaved::ROWS];
            portable::interleaved_group_matmul(dtype, group, &acts, &mut portable);
            for t in 0..n {
                for i in 0..interleaved::ROWS {
                    let (p, got) = (
                        portable[t * interleaved::ROWS + i],
                        prefill[t * rows + g * interleaved::ROWS + i],
                    );
                    assert_eq!(p.to_bits(), got.to_bits(), "{dtype:?} [{t}][{}]", g * 8 + i);
                }
            }
            // Every path this CPU runs, not only the fastest, for prefill and decode.
            for isa in Isa::every() {
                let run = |acts: &[Vec<ActBlock>], out: &mut [f32]| {
                    interleaved_group_matmul(isa, dtype, group, acts, out)
                };
                let mut got = vec![0.0; n * interleaved::ROWS];
                run(&acts, &mut got);
                for (t, act) in acts.iter().enumerate() {
                    let mut one = vec![0.0; interleaved::ROWS];
                    run(std::slice::from_ref(act), &mut one);
                    for i in 0..interleaved::ROWS {
                        let p = portable[t * interleaved::ROWS + i].to_bits();
                        let at = (g * 8 + i, t);
                        assert_eq!(
                            got[t * interleaved::ROWS + i].to_bits(),
                            p,
                            "{isa:?} {dtype:?} {at:?}"
                        );
                        assert_eq!(one[i].to_bits(), p, "{isa:?} {dtype:?} decode {at:?}");
                    }
                }
            }
        }
    }
}

/// Under an emulated CPU, `deploy/test-arm.sh` names the NEON paths it must offer
/// (`REALM_EXPECT_NEON_PATHS`, e.g. `dotprod,neon`): a path the bit-for-bit tests skip
/// because the CPU lacks it would otherwise pass unseen.
#[test]
#[cfg(target_arch = "aarch64")]
fn the_emulated_cpu_runs_the_expected_neon_paths() {
    let Ok(expected) = std::env::var("REALM_EXPECT_NEON_PATHS") else {
        return;
    };
    let expected: Vec<&str> = expected.split(',').map(str::trim).collect();
    let name = |isa: Isa| match isa {
        Isa::Neon(cpu) if cpu.dotprod() => "dotprod",
        Isa::Neon(_) => "neon",
        Isa::Portable => "portable",
    };
    let every: Vec<&str> = Isa::every().into_iter().map(name).collect();
    for path in ["dotprod", "neon"] {
        assert_eq!(
            every.contains(&path),
            expected.contains(&path),
            "{path}: expected paths {expected:?}, found {every:?}"
        );
    }
    let best = ["dotprod", "neon"]
        .into_iter()
        .find(|path| expected.contains(path))
        .unwrap_or("portable");
    assert_eq!(name(Isa::detect()), best, "the path products take");
}

#[test]
#[cfg(target_arch = "x86_64")]
fn the_wide_layout_computes_the_portable_bits() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    // Two groups, and (one token, decode's own loop) 36 groups over several tasks.
    for (dtype, n, rows, cols) in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0]
        .into_iter()
        .flat_map(|d| [(d, 1), (d, 2), (d, 3), (d, 17), (d, 33)].map(|(d, n)| (d, n, 32, 256)))
        .chain([GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0].map(|d| (d, 1, 576, 576)))
    {
        let bytes = random_matrix(dtype, rows, cols, &mut rng);
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let m = QMatrix::new(dtype, rows, cols, &bytes).unwrap();
        let Layout::Wide(cpu) = m.layout else {
            // Without AVX-512 VNNI the eight-row layout serves, as every other test checks.
            assert!(!matches!(Isa::detect(), Isa::X86(cpu) if cpu.avx512()));
            assert_eq!(m.layout, Layout::Interleaved);
            continue;
        };
        assert!(cpu.avx512());
        assert!(
            !wide::repacks(dtype, rows + 8),
            "whole groups of sixteen rows only"
        );
        let mut got = vec![0.0; n * rows];
        m.matmul(&x, n, &mut got);
        assert_near_dequantized(dtype, &bytes, rows, cols, &x, &got);

        // The portable code over the eight-row layout defines the bits.
        let mut packed = vec![0u8; bytes.len()];
        interleaved::repack(dtype, m.row_bytes, &bytes, &mut packed, |_| {});
        let mut acts = m.quantize(&x, QK, portable::quantize_row);
        interleaved::prepare(dtype, &mut acts);
        let group_bytes = interleaved::ROWS * m.row_bytes;
        for (g, group) in packed.chunks_exact(group_bytes).enumerate() {
            let mut want = vec![0.0; n * interleaved::ROWS];
            portable::interleaved_group_matmul(dtype, group, &acts, &mut want);
            for t in 0..n {
                for i in 0..interleaved::ROWS {
                    let (w, r) = (
                        want[t * interleaved::ROWS + i],
                        got[t * rows + g * interleaved::ROWS + i],
                    );
                    assert_eq!(
                        w.to_bits(),
                        r.to_bits(),
                        "{dtype:?} x {n} [{t}][{}]",
                        g * 8 + i
                    );
                }
            }
        }
    }
}

#[test]
fn every_kernel_matches_the_dequantized_product() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // An odd row count reaches the decode path's leftover row, 37 (two tiles of sixteen, one of
    // four and one row) every K prefill tile; n = 1 is decode, the rest prefill: whole token
    // tiles and every leftover count.
    let cols = 256;
    for (rows, dtype, n) in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ]
    .into_iter()
    .flat_map(|d| [1, 2, 3, 4, 5, 6, 7, 8, 9, 17].map(|n| (d, n)))
    .flat_map(|(d, n)| [7, 37].map(|rows| (rows, d, n)))
    {
        // Two super-blocks per row for the K formats.
        let cols = if is_k(dtype) { 2 * cols } else { cols };
        let bytes = random_matrix(dtype, rows, cols, &mut rng);
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let m = QMatrix::new(dtype, rows, cols, &bytes).unwrap();
        let mut got = vec![0.0; n * rows];
        m.matmul(&x, n, &mut got);

        assert_near_dequantized(dtype, &bytes, rows, cols, &x, &got);
        // Every path this CPU runs, not only the fastest (on x86, both K prefill tiles).
        for isa in Isa::every() {
            let mut results = vec![0.0; n * rows];
            if is_k(dtype) {
                let acts = m.quantize(&x, QK_K, |x, q| quantize_row_k(isa, x, q));
                dot_rows_k(isa, dtype, &bytes, m.row_bytes, &acts, &mut results);
            } else {
                let acts = m.quantize(&x, QK, |x, q| quantize_row(isa, x, q));
                dot_rows(isa, dtype, &bytes, m.row_bytes, &acts, &mut results);
            }
            for (i, y) in results.iter().enumerate() {
                let (r, t) = (i / n, i % n);
                assert_eq!(
                    y.to_bits(),
                    got[t * rows + r].to_bits(),
                    "{isa:?} {dtype:?}"
                );
            }
        }
        for t in 0..n {
            let xs = &x[t * cols..(t + 1) * cols];
            for r in 0..rows {
                let g = got[t * rows + r];
                // The portable code computes the very same numbers as the SIMD path.
                let row = &bytes[r * m.row_bytes..(r + 1) * m.row_bytes];
                let portable = portable_dot(dtype, row, xs);
                assert_eq!(portable.to_bits(), g.to_bits(), "{dtype:?} [{t}][{r}]");
            }
        }
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn the_wide_k_layout_computes_the_portable_bits() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // One and three groups of one and three super-blocks, decode and every leftover count of a
    // prefill's token tiles; then decode over 40 groups in several tasks (gemma3's down shape).
    let small = [1, 2, 3, 5, 6, 7, 13].into_iter().flat_map(|n| {
        [(16, 256), (48, 768)]
            .into_iter()
            .map(move |(rows, cols)| (n, rows, cols))
    });
    for (dtype, (n, rows, cols)) in [GgmlType::Q4K, GgmlType::Q6K]
        .into_iter()
        .flat_map(|d| small.clone().chain([(1, 640, 2048)]).map(move |s| (d, s)))
    {
        let bytes = random_matrix(dtype, rows, cols, &mut rng);
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let m = QMatrix::new(dtype, rows, cols, &bytes).unwrap();
        let Layout::Wide(cpu) = m.layout else {
            // Without AVX-512 VNNI the K formats keep the file's layout.
            assert!(!matches!(Isa::detect(), Isa::X86(cpu) if cpu.avx512()));
            assert_eq!(m.layout, Layout::File);
            continue;
        };
        assert!(cpu.avx512());
        assert!(!wide::repacks(dtype, rows + 8), "whole groups only");
        let mut got = vec![0.0; n * rows];
        m.matmul(&x, n, &mut got);
        assert_near_dequantized(dtype, &bytes, rows, cols, &x, &got);

        // The portable code over the file's layout defines the bits.
        let acts = m.quantize(&x, QK_K, portable::quantize_row_k);
        let mut want = vec![0.0; n * rows];
        portable::dot_rows_k(dtype, &bytes, m.row_bytes, &acts, &mut want);
        for t in 0..n {
            for r in 0..rows {
                assert_eq!(
                    want[r * n + t].to_bits(),
                    got[t * rows + r].to_bits(),
                    "{dtype:?} {rows}x{cols} x {n} [{t}][{r}]"
                );
            }
        }
    }
}
