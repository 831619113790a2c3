//! Throughput of Realm's quantized matrix kernels, single-threaded and with all threads:
//! decode-sized products (GB/s of weights streamed and µs per product for each format), then
//! products with 16 tokens (a decode step of 16 sessions) and 128 (a prefill), in GOP/s.
//! Run with `cargo bench -p realm-common --bench kernels`; `REALM_BENCH=prefill` runs only the
//! 128-token products (SmolLM2's and gemma3's shapes).

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

fn run(label: &str, pool: &rayon::ThreadPool) {
    // SmolLM2's FFN shape (1536 × 576), gemma3's FFN-down shape (640 × 2048) and a tall
    // head-like one.
    for (dtype, rows, cols) in [
        (GgmlType::Q4_0, 1536, 576),
        (GgmlType::Q4_1, 1536, 576),
        (GgmlType::Q5_0, 2048, 640),
        (GgmlType::Q8_0, 1536, 576),
        (GgmlType::Q4K, 640, 2048),
        (GgmlType::Q6K, 640, 2048),
        (GgmlType::Q8_0, 16384, 576),
    ] {
        let bytes = matrix(dtype, rows, cols);
        let m = QMatrix::new(dtype, rows, cols, &bytes).expect("supported format");
        // Enough copies to stream ~128 MB per pass, so weights come from memory, as in a
        // real decode step, not from cache.
        let copies = (128 << 20) / bytes.len() + 1;
        let ms: Vec<QMatrix> = (0..copies).map(|_| m.clone()).collect();
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
            let streamed = (0..3)
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
            "{label:>10} {dtype:?} {rows}x{cols}: cached {:7.1} us {:6.2} GB/s; from memory {:7.1} us {:6.2} GB/s",
            cached * 1e6,
            gbs(cached),
            streamed * 1e6,
            gbs(streamed)
        );
    }
}

/// A 128-token prefill, and a decode step of 16 sessions, through one FFN-sized matrix.
fn prefill(label: &str, pool: &rayon::ThreadPool) {
    let tokens: &[usize] = if prefill_only() { &[128] } else { &[16, 128] };
    for &n in tokens {
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

fn prefill_only() -> bool {
    std::env::var("REALM_BENCH").is_ok_and(|v| v == "prefill")
}

fn main() {
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    if !prefill_only() {
        run("1 thread", &one);
    }
    prefill("1 thread", &one);
    let all = rayon::ThreadPoolBuilder::new().build().expect("pool");
    let label = format!("{} threads", all.current_num_threads());
    if !prefill_only() {
        run(&label, &all);
    }
    prefill(&label, &all);
}
