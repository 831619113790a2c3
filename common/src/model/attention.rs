//! Rotary position embeddings and grouped-query attention over a session's KV cache, shared by
//! the architectures.

use candle_core::Tensor;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

pub(crate) use super::config::RopeStyle;
use crate::error::{Error, Result};
use crate::kernels::{attention as dot, Isa};
use crate::kv::LayerKv;
use crate::model::elementwise::{for_each_row, with_values};

/// A rotary embedding, computed as the reference engine computes it, bit for bit: the angle of
/// pair `i` at position `p` is `p · θ^i` with `θ = base^(-2/d)`, the power built up by one f32
/// multiplication per pair (not `base^(-2i/d)` directly), divided by the pair's frequency factor
/// (Llama 3's `rope_freqs`, Phi-3's LongRoPE), scaled by the linear position scale; its sine and
/// cosine in f32, times a magnitude (LongRoPE's attention factor); each rotated value a fused
/// multiply-add, `x₀·cos − x₁·sin` as `fma(x₀, cos, −(x₁·sin))`. Queries and keys are rounded to
/// f16 after this: an angle or a product a bit off flips that rounding in a few values per token,
/// which moves the answers as far from the reference as a missing feature would at near-ties.
#[derive(Debug, Clone)]
pub struct Rope {
    pub style: RopeStyle,
    /// `base^(-2/d)`: the ratio of the angles of consecutive pairs.
    theta_scale: f32,
    /// Per-pair divisors of the angle, if any.
    factors: Option<Vec<f32>>,
    /// Pairs rotated: `head_dim / 2`.
    pairs: usize,
    position_scale: f32,
    /// A factor on every sine and cosine (1 for none).
    magnitude: f32,
}

impl Rope {
    /// A rotation whose pair `i` turns `factors[i]` times slower, with sines and cosines
    /// multiplied by `magnitude`. `factors` holds `head_dim / 2` values.
    pub fn new(
        style: RopeStyle,
        head_dim: usize,
        base: f32,
        position_scale: f32,
        factors: Option<&[f32]>,
        magnitude: f32,
    ) -> Self {
        Self {
            style,
            theta_scale: base.powf(-2.0 / head_dim as f32),
            factors: factors.map(<[f32]>::to_vec),
            pairs: head_dim / 2,
            position_scale,
            magnitude,
        }
    }

    /// `(cos, sin)` of every pair's angle at each of `positions`, position-major: computed
    /// once per step and applied to the queries and the keys. Every layer of a step asks for
    /// the same positions, most with the same rotation: the last few tables this thread made
    /// are kept and handed out again (a sine and a cosine per pair cost more than the rotation).
    pub fn table(&self, positions: &[usize]) -> std::rc::Rc<[(f32, f32)]> {
        use std::cell::RefCell;
        use std::rc::Rc;
        /// Tables a thread keeps: gemma's local and global layers alternate two rotations.
        const KEPT: usize = 4;
        /// The largest table kept (256 KiB): a 128-token prompt's of 128 pairs.
        const KEPT_ANGLES: usize = 32 * 1024;
        type Kept = Vec<(Rope, Vec<usize>, Rc<[(f32, f32)]>)>;
        thread_local! {
            static TABLES: RefCell<Kept> = const { RefCell::new(Vec::new()) };
        }
        TABLES.with_borrow_mut(|kept| {
            if let Some(at) = kept
                .iter()
                .position(|(rope, p, _)| rope.same_angles(self) && p == positions)
            {
                let entry = kept.remove(at);
                let table = entry.2.clone();
                kept.push(entry);
                return table;
            }
            let table: Rc<[(f32, f32)]> = self.compute_table(positions).into();
            // A long prompt's table is not kept: its memory would outlive the prompt.
            if table.len() <= KEPT_ANGLES {
                if kept.len() == KEPT {
                    kept.remove(0);
                }
                kept.push((self.clone(), positions.to_vec(), table.clone()));
            }
            table
        })
    }

    /// Whether `other` turns every pair by the same angles as `self`.
    fn same_angles(&self, other: &Rope) -> bool {
        self.theta_scale.to_bits() == other.theta_scale.to_bits()
            && self.pairs == other.pairs
            && self.position_scale.to_bits() == other.position_scale.to_bits()
            && self.magnitude.to_bits() == other.magnitude.to_bits()
            && self.factors == other.factors
    }

    fn compute_table(&self, positions: &[usize]) -> Vec<(f32, f32)> {
        let mut table = Vec::with_capacity(positions.len() * self.pairs);
        for &position in positions {
            let mut theta = position as f32;
            for i in 0..self.pairs {
                let extrapolated = match &self.factors {
                    Some(f) => theta / f[i],
                    None => theta,
                };
                let angle = self.position_scale * extrapolated;
                theta *= self.theta_scale;
                table.push((angle.cos() * self.magnitude, angle.sin() * self.magnitude));
            }
        }
        table
    }

    /// Rotates `x` (`[heads, n_tokens, head_dim]`) by `table`, the [`table`](Self::table) of
    /// the tokens' positions.
    pub fn apply(&self, x: &Tensor, table: &[(f32, f32)]) -> Result<Tensor> {
        let (_, n, head_dim) = x.dims3()?;
        if table.len() != n * self.pairs || head_dim != 2 * self.pairs {
            return Err(Error::InvalidArgument(format!(
                "cannot rotate shape {:?} by {} angles of {} pairs",
                x.dims(),
                table.len(),
                self.pairs
            )));
        }
        let mut values = x.flatten_all()?.to_vec1::<f32>()?;
        let (pairs, style) = (self.pairs, self.style);
        for_each_row(&mut values, head_dim, |row, x| {
            let angles = &table[(row % n) * pairs..][..pairs];
            for (i, &(cos, sin)) in angles.iter().enumerate() {
                let (a, b) = match style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + pairs),
                };
                let (x0, x1) = (x[a], x[b]);
                x[a] = x0.mul_add(cos, -(x1 * sin));
                x[b] = x0.mul_add(sin, x1 * cos);
            }
        });
        Ok(Tensor::from_vec(values, x.shape().clone(), x.device())?)
    }
}

/// Steps of a session this long or longer attend in f32 ([`Precision::Wide`]).
pub(crate) const WIDE_BATCH: usize = 64;

/// How a step's queries meet the cache. Decode-size steps round each query to f16 like the keys
/// and accumulate the weighted values in f16; steps of [`WIDE_BATCH`] tokens or more (long
/// prompts) keep both in f32. This is the numerics of the fused attention kernels other GGUF
/// engines run on CPU by default, which keeps greedy output and perplexity identical to theirs
/// where candidates nearly tie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Narrow,
    Wide,
}

impl Precision {
    /// The precision of a step of `tokens` tokens of one session. A prompt sent in chunks takes
    /// the precision of the whole prompt, so that chunking never changes a session's numbers.
    pub fn of_step(tokens: usize) -> Self {
        if tokens < WIDE_BATCH {
            Self::Narrow
        } else {
            Self::Wide
        }
    }
}

/// One session's rows in a batched step of one layer: `rows` consecutive rows of the step, the
/// first at `position` (the number of tokens already in `kv`), attended against `kv` alone.
#[derive(Debug)]
pub struct Segment<'a> {
    pub position: usize,
    pub rows: usize,
    pub precision: Precision,
    pub kv: &'a mut LayerKv,
}

/// The position of every row of a step made of `segments`, in row order.
pub(crate) fn positions(segments: &[Segment<'_>]) -> Vec<usize> {
    segments
        .iter()
        .flat_map(|s| s.position..s.position + s.rows)
        .collect()
}

/// Scaled dot-product attention with grouped KV heads, each session's rows against that
/// session's f16 cache.
///
/// `q` is `[n_heads, n, head_dim]`, `k` and `v` are `[n_kv_heads, n, head_dim]` for the step's
/// rows (already rotated), which `segments` divide among the sessions in row order; each
/// segment's keys and values are appended to its cache first. A row at position `p` sees its
/// session's cached positions `j <= p`, and with a `window` only those with `p - j < window`.
/// Scores are `scale · q·k`, passed through `c · tanh(s / c)` with a `softcap` `c`.
/// Returns `[n, n_heads * head_dim]`.
///
/// One pass per query with an online softmax, rescaled whenever a new maximum score appears, in
/// the segment's [`Precision`]. A row's result depends on its session's cache and its own query
/// alone, so a session gets the same bits in a batch as on its own.
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &mut [Segment<'_>],
    window: Option<usize>,
    scale: f64,
    softcap: Option<f32>,
) -> Result<Tensor> {
    let (n_heads, n, head_dim) = q.dims3()?;
    let n_kv_heads = k.dims()[0];
    let group = n_heads / n_kv_heads;
    let width = n_kv_heads * head_dim;
    if segments.iter().map(|s| s.rows).sum::<usize>() != n {
        return Err(Error::InvalidArgument(format!(
            "the sessions of a step hold {} rows, the step {n}",
            segments.iter().map(|s| s.rows).sum::<usize>()
        )));
    }
    // Position-major `[n][kv_heads * head_dim]` for the caches (one row already is), read in
    // place where the tensors allow.
    let position_major = |t: &Tensor| -> Result<Tensor> {
        Ok(if n == 1 {
            t.clone()
        } else {
            t.transpose(0, 1)?.contiguous()?
        })
    };
    let (keys, values) = (position_major(k)?, position_major(v)?);
    // Each row's session and position.
    let mut rows = Vec::with_capacity(n);
    with_values(&keys, |keys| {
        with_values(&values, |values| {
            let mut first = 0;
            for (s, segment) in segments.iter_mut().enumerate() {
                let at = first * width..(first + segment.rows) * width;
                segment.kv.append(width, &keys[at.clone()], &values[at]);
                rows.extend((segment.position..segment.position + segment.rows).map(|p| (s, p)));
                first += segment.rows;
            }
        })
    })??;
    let caches: Vec<(&LayerKv, bool)> = segments
        .iter()
        .map(|s| (&*s.kv, s.precision == Precision::Narrow))
        .collect();
    let device = q.device().clone();
    let scale = scale as f32;
    let isa = Isa::detect();
    let mut out = vec![0.0f32; n * n_heads * head_dim];
    // One task per row and `together` heads of one KV head (a group of grouped-query
    // attention, or a part of one), which share the loads of the values: as many heads as
    // still leave a task for every thread. Each task writes its own slice of `out`, and each
    // split of the loop keeps its scratch from task to task.
    let threads = rayon::current_num_threads();
    let together = (1..=group.min(4))
        .rev()
        .find(|m| group.is_multiple_of(*m) && n * n_heads / m >= threads)
        .unwrap_or(1);
    let tasks_per_row = n_heads / together;
    with_values(q, |q| {
        out.par_chunks_mut(together * head_dim)
            .enumerate()
            .for_each_init(Scratch::default, |scratch, (task, out)| {
                let (i, first_head) = (task / tasks_per_row, task % tasks_per_row * together);
                let (s, p) = rows[i];
                let (kv, narrow) = caches[s];
                let kv_head = first_head / group;
                let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
                let count = p + 1 - first;
                let Scratch {
                    query,
                    q16,
                    buf,
                    scores,
                    steps,
                    sums,
                } = scratch;
                scores.clear();
                for h in first_head..first_head + together {
                    query.clear();
                    query.extend_from_slice(&q[(h * n + i) * head_dim..(h * n + i + 1) * head_dim]);
                    if narrow {
                        q16.resize(head_dim, f16::ZERO);
                        q16.convert_from_f32_slice(query);
                        q16.convert_to_f32_slice(query);
                    }
                    let skip = dot::scores(isa, query, kv, kv_head, first, count, buf);
                    let raw = &buf[skip..skip + count];
                    match softcap {
                        None => scores.extend(raw.iter().map(|s| s * scale)),
                        Some(cap) => scores
                            .extend(raw.iter().map(|s| (s * scale * cap.recip()).tanh() * cap)),
                    }
                }
                dot::softmax_values(
                    isa, scores, count, kv, kv_head, first, narrow, out, steps, sums,
                );
            });
    })?;
    Ok(Tensor::from_vec(out, (n, n_heads * head_dim), &device)?)
}

/// What one attention task reuses from the last.
#[derive(Default)]
struct Scratch {
    query: Vec<f32>,
    q16: Vec<f16>,
    buf: Vec<f32>,
    scores: Vec<f32>,
    steps: Vec<(f32, f32)>,
    sums: Vec<f32>,
}

/// `[n, heads * head_dim]` → `[heads, n, head_dim]`, contiguous.
pub(crate) fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let n = x.dim(0)?;
    Ok(x.reshape((n, heads, head_dim))?
        .transpose(0, 1)?
        .contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_rope_tables_are_each_rotations_own() {
        let rope = |base: f32, factors: Option<&[f32]>| {
            Rope::new(RopeStyle::Neox, 8, base, 1.0, factors, 1.0)
        };
        let (global, local) = (rope(1_000_000.0, None), rope(10_000.0, None));
        let scaled = rope(10_000.0, Some(&[1.0, 2.0, 4.0, 8.0]));
        let bits = |t: &[(f32, f32)]| {
            t.iter()
                .flat_map(|&(c, s)| [c.to_bits(), s.to_bits()])
                .collect::<Vec<_>>()
        };
        for positions in [vec![5], vec![6], vec![0, 1, 2], vec![5]] {
            for r in [&global, &local, &scaled, &global] {
                // Asked twice (the second from what the thread kept): the computed table.
                let want = bits(&r.compute_table(&positions));
                assert_eq!(bits(&r.table(&positions)), want);
                assert_eq!(bits(&r.table(&positions)), want);
            }
        }
        assert_ne!(
            bits(&global.table(&[7])),
            bits(&local.table(&[7])),
            "two rotations, two tables"
        );
        // A long prompt's table is computed, not kept, and still right.
        let long: Vec<usize> = (0..20_000).collect();
        assert_eq!(bits(&local.table(&long)), bits(&local.compute_table(&long)));
    }
}
