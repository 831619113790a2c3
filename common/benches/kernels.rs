//! Throughput of Realm's quantized matrix kernels, single-threaded and with all threads:
//! decode-sized products (GB/s of weights streamed and µs per product for each format), then
//! products with 16 tokens (a decode step of 16 sessions) and 128 (a prefill), in GOP/s.
//! Run with `cargo bench -p realm-common --bench kernels`; `REALM_BENCH=word` runs only the
//! cases whose line contains `word` (say `decode`, `Q4_K` or `128 tokens`, a prefill).

use std::time::Instant;

use half::f16;
use realm_common::kernels::QMatrix;
use realm_common::quant::GgmlType;

fn matrix(dtype: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut bytes: Vec<u8> = (0..rows * cols / dtype.block_size() * dtype.type_size())
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    // Where each format keeps its f16 scale (and minimum).
    let (scale_at, min_at) = match dtype {
        GgmlType::Q6K => (208, None),
        GgmlType::Q4_1 | GgmlType::Q4K => (0, Some(2)),
        _ => (0, None),
    };
    for block in bytes.chunks_exact_mut(dtype.type_size()) {
        block[scale_at..scale_at + 2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
        if let Some(at) = min_at {
            block[at..at + 2].copy_from_slice(&f16::from_f32(-0.05).to_le_bytes());
        }
    }
    bytes
}

/// Whether the case named `name` runs: `REALM_BENCH`, when set, is part of the names to run.
fn selected(name: &str) -> bool {
    std::env::var("REALM_BENCH").map_or(true, |want| name.contains(&want))
}

fn run(label: &str, pool: &rayon::ThreadPool) {
    // SmolLM2's shapes (attention 576 × 576 and 192 × 576, FFN 1536 × 576 and 576 × 1536, the
    // 49152 × 576 head), gemma3's FFN-down shape (640 × 2048) and its 262144 × 640 head, and a
    // 7B model's.
    for (dtype, rows, cols) in [
        (GgmlType::Q4_0, 1536, 576),
        (GgmlType::Q4_1, 192, 576),
        (GgmlType::Q4_1, 576, 576),
        (GgmlType::Q4_1, 1536, 576),
        (GgmlType::Q4_1, 576, 1536),
        (GgmlType::Q5_0, 2048, 640),
        (GgmlType::Q8_0, 1536, 576),
        (GgmlType::Q4K, 640, 2048),
        (GgmlType::Q6K, 640, 2048),
        // A 7B model's widths in its `Q4_K_M` formats: attention, FFN gate/up, FFN down.
        (GgmlType::Q4K, 4096, 4096),
        (GgmlType::Q4K, 11008, 4096),
        (GgmlType::Q6K, 4096, 11008),
        (GgmlType::Q8_0, 49152, 576),
        (GgmlType::Q8_0, 262144, 640),
    ] {
        if !selected(&format!("{label} decode {dtype:?} {rows}x{cols}")) {
            continue;
        }
        let bytes = matrix(dtype, rows, cols);
        let m = QMatrix::new(dtype, rows, cols, &bytes).expect("supported format");
        // Enough copies to stream ~128 MB per pass, so weights come from memory, as in a
        // real decode step, not from cache.
        let copies = (128 << 20) / bytes.len() + 1;
        // Copies of their own: clones would share the bytes.
        let ms: Vec<QMatrix> = (0..copies)
            .map(|_| QMatrix::new(dtype, rows, cols, &bytes).expect("supported format"))
            .collect();
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let mut out = vec![0.0f32; rows];
        let (cached, streamed) = pool.install(|| {
            let cached = (0..200)
                .map(|_| {
                    let t = Instant::now();
                    m.matmul(&x, 1, &mut out);
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            let streamed = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    for m in &ms {
                        m.matmul(&x, 1, &mut out);
                    }
                    t.elapsed().as_secs_f64() / copies as f64
                })
                .fold(f64::INFINITY, f64::min);
            (cached, streamed)
        });
        let gbs = |t: f64| bytes.len() as f64 / t / 1e9;
        println!(
            "{label:>10} decode {dtype:?} {rows}x{cols}: cached {:7.1} us {:6.2} GB/s; from memory {:7.1} us {:6.2} GB/s",
            cached * 1e6,
            gbs(cached),
            streamed * 1e6,
            gbs(streamed)
        );
    }
}

/// A decode step's products through SmolLM2's 30 `Q4_1` layers (attention's four matrices,
/// the FFN's three) and its `Q8_0` head, one after the other as the model runs them: GB/s of
/// weights and µs per step, the best and the median of 7 steps.
fn decode_step(label: &str, pool: &rayon::ThreadPool) {
    if !selected(&format!("{label} decode step SmolLM2")) {
        return;
    }
    let layer = [
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let shapes = (0..30)
        .flat_map(|_| layer.map(|(r, c)| (GgmlType::Q4_1, r, c)))
        .chain([(GgmlType::Q8_0, 49152, 576)]);
    let ms: Vec<QMatrix> = shapes
        .map(|(dtype, rows, cols)| {
            QMatrix::new(dtype, rows, cols, &matrix(dtype, rows, cols)).expect("supported format")
        })
        .collect();
    let bytes: f64 = ms
        .iter()
        .map(|m| {
            let dtype = if m.rows() == 49152 {
                GgmlType::Q8_0
            } else {
                GgmlType::Q4_1
            };
            (m.rows() * m.cols() / 32 * dtype.type_size()) as f64
        })
        .sum();
    let xs: Vec<f32> = (0..1536)
        .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
        .collect();
    let mut out = vec![0.0f32; 49152];
    let mut times: Vec<f64> = pool.install(|| {
        (0..7)
            .map(|_| {
                let t = Instant::now();
                for m in &ms {
                    m.matmul(&xs[..m.cols()], 1, &mut out[..m.rows()]);
                }
                t.elapsed().as_secs_f64()
            })
            .collect()
    });
    times.sort_by(f64::total_cmp);
    println!(
        "{label:>10} decode step SmolLM2 ({:.1} MB): best {:7.0} us {:6.2} GB/s; median {:7.0} us {:6.2} GB/s",
        bytes / 1e6,
        times[0] * 1e6,
        bytes / times[0] / 1e9,
        times[3] * 1e6,
        bytes / times[3] / 1e9,
    );
}

/// A 128-token prefill, and a decode step of 16 sessions, through one FFN-sized matrix.
fn prefill(label: &str, pool: &rayon::ThreadPool) {
    for n in [16, 128] {
        batch(label, pool, n);
    }
}

fn batch(label: &str, pool: &rayon::ThreadPool, n: usize) {
    for (dtype, rows, cols) in [
        (GgmlType::Q4_0, 1536, 576),
        (GgmlType::Q4_1, 1536, 576),
        (GgmlType::Q5_0, 1536, 576),
        (GgmlType::Q8_0, 1536, 576),
        (GgmlType::Q4K, 640, 2048),
        (GgmlType::Q6K, 640, 2048),
        // gemma3's other shapes: FFN gate and up, attention queries, attention output.
        (GgmlType::Q5_0, 2048, 640),
        (GgmlType::Q5_0, 1024, 640),
        (GgmlType::Q4K, 640, 1024),
    ] {
        if !selected(&format!("{label} {dtype:?} {rows}x{cols} x {n} tokens")) {
            continue;
        }
        let bytes = matrix(dtype, rows, cols);
        let m = QMatrix::new(dtype, rows, cols, &bytes).expect("supported format");
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let mut out = vec![0.0f32; n * rows];
        let best = pool.install(|| {
            (0..20)
                .map(|_| {
                    let t = Instant::now();
                    m.matmul(&x, n, &mut out);
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        });
        let gops = 2.0 * (rows * cols * n) as f64 / best / 1e9;
        println!(
            "{label:>10} {dtype:?} {rows}x{cols} x {n} tokens: {:8.1} us  {gops:6.1} GOP/s",
            best * 1e6
        );
    }
}

fn main() {
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    run("1 thread", &one);
    decode_step("1 thread", &one);
    prefill("1 thread", &one);
    let all = rayon::ThreadPoolBuilder::new().build().expect("pool");
    let label = format!("{} threads", all.current_num_threads());
    run(&label, &all);
    decode_step(&label, &all);
    prefill(&label, &all);
}
