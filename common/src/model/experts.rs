//! A mixture-of-experts MLP, as Mixtral-style llama files and Qwen 3 MoE store it: a router
//! matrix (`ffn_gate_inp`, `[d_model → experts]`) and each projection of every expert in one
//! three-dimensional tensor (`ffn_{gate,up,down}_exps`, experts outermost).
//!
//! Per token the router's logits go through a softmax, the `used` most probable experts run
//! (each a gated MLP whose matrices are slices of the tensors, loaded through the block's
//! [`Backend`] like matrices of their own: on the CPU, computed straight from the mapping),
//! their weights are renormalized to sum to one, and their outputs are summed, in the order of
//! their rank, weighted. The rows of a step are grouped by expert, so each expert's weights are
//! read once per step however many tokens chose it. The router and the weighted sum run on the
//! host, over the step's rows read back.

use candle_core::Tensor;

use super::backend::{Backend, Residence};
use super::config::block_tensors::{FFN_DOWN_EXPS, FFN_GATE_EXPS, FFN_GATE_INP, FFN_UP_EXPS};
use super::config::{Activation, Experts};
use super::load_matrix;
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, TensorInfo};
use crate::quant::load_f32;

/// The smallest weight sum the renormalization divides by (the reference engines' floor, the
/// smallest normal f16).
const MIN_WEIGHT_SUM: f32 = half::f16::MIN_POSITIVE.to_f32_const();

#[derive(Debug)]
struct Expert<B: Backend> {
    gate: B::Matrix,
    up: B::Matrix,
    down: B::Matrix,
}

/// The router's matrix `[experts, d_model]` in f32. Each token's logits are computed on their
/// own, in one fixed order (f64 sums), so a token routes the same way whatever else is in its
/// step: a batched matrix product may sum in another order for another number of rows, and a
/// near-tie between two experts would then go either way.
#[derive(Debug)]
struct Router {
    weights: Vec<f32>,
    d_model: usize,
}

impl Router {
    fn logits(&self, x: &[f32]) -> Vec<f32> {
        self.weights
            .chunks_exact(self.d_model)
            .map(|w| {
                w.iter()
                    .zip(x)
                    .map(|(&w, &x)| f64::from(w * x))
                    .sum::<f64>() as f32
            })
            .collect()
    }
}

#[derive(Debug)]
pub(super) struct MixtureOfExperts<B: Backend> {
    router: Router,
    experts: Vec<Expert<B>>,
    used: usize,
    scale: f32,
    activation: Activation,
}

impl<B: Backend> MixtureOfExperts<B> {
    pub fn load(
        backend: &B,
        file: &GgufFile,
        layer: usize,
        d_model: usize,
        config: &Experts,
        activation: Activation,
        residence: Residence,
    ) -> Result<Self> {
        let name = |n: &str| format!("blk.{layer}.{n}");
        let info = file.tensor_info(&name(FFN_GATE_INP))?;
        if info.dims != [d_model as u64, config.count as u64] {
            return Err(Error::Tensor {
                name: name(FFN_GATE_INP),
                problem: format!(
                    "dimensions {:?}, where the model routes d_model {d_model} to {} experts",
                    info.dims, config.count
                ),
            });
        }
        let router = Router {
            weights: load_f32(file, info)?,
            d_model,
        };
        let f = config.ffn_dim;
        let gate = expert_slices(file, &name(FFN_GATE_EXPS), d_model, f, config.count)?;
        let up = expert_slices(file, &name(FFN_UP_EXPS), d_model, f, config.count)?;
        let down = expert_slices(file, &name(FFN_DOWN_EXPS), f, d_model, config.count)?;
        let experts = gate
            .iter()
            .zip(&up)
            .zip(&down)
            .map(|((g, u), d)| {
                Ok(Expert {
                    gate: load_matrix(backend, file, g, residence)?,
                    up: load_matrix(backend, file, u, residence)?,
                    down: load_matrix(backend, file, d, residence)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            router,
            experts,
            used: config.used,
            scale: config.scale,
            activation,
        })
    }

    /// `x` is `[n, d_model]`; returns `[n, d_model]`.
    pub fn forward(&self, backend: &B, x: &Tensor) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let rows = x.to_vec2::<f32>()?;
        // Each row's chosen experts and their weights, in rank order.
        let choices: Vec<Vec<(usize, f32)>> = rows
            .iter()
            .map(|row| self.route(&self.router.logits(row)))
            .collect();
        // Each expert's rows: (row, rank).
        let mut assigned: Vec<Vec<(usize, usize)>> = vec![Vec::new(); self.experts.len()];
        for (row, chosen) in choices.iter().enumerate() {
            for (rank, &(expert, _)) in chosen.iter().enumerate() {
                assigned[expert].push((row, rank));
            }
        }
        // Weighted outputs per (row, rank), summed in rank order below.
        let mut parts = vec![0f32; n * self.used * d];
        for (expert, rows) in self.experts.iter().zip(&assigned) {
            if rows.is_empty() {
                continue;
            }
            let index: Vec<u32> = rows.iter().map(|&(row, _)| row as u32).collect();
            let index = Tensor::from_vec(index, rows.len(), x.device())?;
            let input = x.index_select(&index, 0)?;
            let gate = backend.matmul(&input, &expert.gate, None)?;
            let up = backend.matmul(&input, &expert.up, None)?;
            let hidden = backend.gated(self.activation, &gate, &up)?;
            let out = backend
                .matmul(&hidden, &expert.down, None)?
                .to_vec2::<f32>()?;
            for (&(row, rank), y) in rows.iter().zip(&out) {
                let w = choices[row][rank].1;
                let part = &mut parts[(row * self.used + rank) * d..][..d];
                for (p, v) in part.iter_mut().zip(y) {
                    *p = v * w;
                }
            }
        }
        let mut out = vec![0f32; n * d];
        for (row, sum) in out.chunks_exact_mut(d).enumerate() {
            let row_parts = &parts[row * self.used * d..][..self.used * d];
            sum.copy_from_slice(&row_parts[..d]);
            for part in row_parts.chunks_exact(d).skip(1) {
                sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
            }
        }
        Ok(Tensor::from_vec(out, (n, d), x.device())?)
    }

    /// The `used` experts of one token, most probable first, with their weights.
    fn route(&self, logits: &[f32]) -> Vec<(usize, f32)> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let sum: f64 = exps.iter().map(|&e| e as f64).sum();
        let inv = (1.0 / sum) as f32;
        let probs: Vec<f32> = exps.iter().map(|e| e * inv).collect();
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut chosen: Vec<(usize, f32)> =
            order[..self.used].iter().map(|&e| (e, probs[e])).collect();
        let total = chosen.iter().map(|&(_, w)| w as f64).sum::<f64>() as f32;
        let total = total.max(MIN_WEIGHT_SUM);
        chosen.iter_mut().for_each(|(_, w)| *w /= total);
        if self.scale != 1.0 {
            chosen.iter_mut().for_each(|(_, w)| *w *= self.scale);
        }
        chosen
    }
}

/// The `count` `[rows, cols]` matrices of a three-dimensional expert tensor, each as the
/// tensor info of its slice of the file.
fn expert_slices(
    file: &GgufFile,
    name: &str,
    cols: usize,
    rows: usize,
    count: usize,
) -> Result<Vec<TensorInfo>> {
    let info = file.tensor_info(name)?;
    if info.dims != [cols as u64, rows as u64, count as u64] {
        return Err(Error::Tensor {
            name: name.to_string(),
            problem: format!(
                "expected dimensions [{cols}, {rows}, {count}], found {:?}",
                info.dims
            ),
        });
    }
    let bytes = info.size / count as u64;
    Ok((0..count)
        .map(|e| TensorInfo {
            name: format!("{name}[{e}]"),
            dims: vec![cols as u64, rows as u64],
            dtype: info.dtype,
            offset: info.offset + e as u64 * bytes,
            size: bytes,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Cpu;
    use crate::synthetic::{self, SyntheticArch, SyntheticDType, SyntheticSpec};

    /// The layer manager keeps a resident layer's borrowed pages mapped and gives back those of
    /// tensors it copied: an expert tensor must be judged as its slices are loaded, or its
    /// experts would fault their weights back in at every step. Weights kept for a shard's life
    /// are all copies.
    #[test]
    fn an_expert_tensor_borrows_the_mapping_as_its_slices_do() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (dtype, borrowed) in [(SyntheticDType::Q4KM, true), (SyntheticDType::Q8_0, false)] {
            let path = dir.path().join("moe.gguf");
            let spec = SyntheticSpec::fixture(SyntheticArch::Mixtral, dtype);
            synthetic::write(&path, &spec).expect("write");
            let file = GgufFile::open(&path).expect("open");
            let (d, f) = (spec.d_model, spec.ffn_dim);
            for (name, cols, rows) in [
                (FFN_GATE_EXPS, d, f),
                (FFN_UP_EXPS, d, f),
                (FFN_DOWN_EXPS, f, d),
            ] {
                let name = format!("blk.0.{name}");
                let whole = file.tensor_info(&name).expect("tensor");
                let streamed = Residence::Streamed;
                assert_eq!(Cpu.borrows_mapping(whole, streamed), borrowed, "{name}");
                assert!(!Cpu.borrows_mapping(whole, Residence::Kept), "{name}");
                for slice in expert_slices(&file, &name, cols, rows, spec.experts).expect("slices")
                {
                    let name = &slice.name;
                    assert_eq!(Cpu.borrows_mapping(&slice, streamed), borrowed, "{name}");
                    assert!(!Cpu.borrows_mapping(&slice, Residence::Kept), "{name}");
                }
            }
        }
    }
}
