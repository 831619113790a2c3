//! Entry points for fuzzing (`common/fuzz`, run by `deploy/fuzz.sh`) and for the test that
//! replays what fuzzing found (`common/tests/fuzz_regressions.rs`). Each takes arbitrary bytes
//! from a peer or a file and must return, whatever they hold: an error is fine, a panic is a bug.

use std::io::Write;

use prost::Message;
use realm_proto::pb;

use crate::gguf::GgufFile;
use crate::model::ModelConfig;
use crate::tokenizer::Tokenizer;
use crate::wire::{Activations, ModelIdentity, WireDType};

/// Reads `bytes` as a GGUF model file the way a worker and a coordinator do: the header, the
/// model configuration and identity, the tokenizer, and every tensor's data.
pub fn gguf(bytes: &[u8]) {
    // The reader maps files, so the bytes go through one.
    let Ok(mut file) = tempfile_in_memory() else {
        return;
    };
    if file.write_all(bytes).and_then(|()| file.flush()).is_err() {
        return;
    }
    let Ok(gguf) = GgufFile::open(file.path()) else {
        return;
    };
    let _ = gguf.header_sha256();
    for info in gguf.tensors.values() {
        let _ = gguf.tensor_data(info);
    }
    if let Ok(config) = ModelConfig::from_gguf(&gguf) {
        let _ = ModelIdentity::of(&gguf, &config);
    }
    if let Ok(tokenizer) = Tokenizer::from_gguf(&gguf) {
        if let Ok(ids) = tokenizer.encode("Hello, world!", true, true) {
            let _ = tokenizer.decode(&ids);
        }
    }
}

/// A temporary file, in RAM where the system has `/dev/shm`.
fn tempfile_in_memory() -> std::io::Result<tempfile::NamedTempFile> {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::NamedTempFile::new_in(shm)
    } else {
        tempfile::NamedTempFile::new()
    }
}

/// Decodes `bytes` as a wire tensor the way a worker decodes a forward request's hidden state
/// (the first byte picks the model width), and as the raw data of a tensor of every dtype.
pub fn wire(bytes: &[u8]) {
    let Some((&first, rest)) = bytes.split_first() else {
        return;
    };
    let d_model = usize::from(first % 64) + 1;
    if let Ok(t) = pb::Tensor::decode(rest) {
        if let Ok(a) = Activations::from_wire(&t, d_model) {
            let _ = Activations::to_wire(&a.hidden, a.dtype);
        }
    }
    for dtype in [pb::DataType::F32, pb::DataType::F16, pb::DataType::Bf16] {
        let Ok(wire) = WireDType::try_from(dtype as i32) else {
            continue;
        };
        let rows = rest.len() / (d_model * wire.size());
        let t = pb::Tensor {
            shape: vec![rows as u64, d_model as u64],
            dtype: dtype as i32,
            data: rest.to_vec(),
        };
        let _ = Activations::from_wire(&t, d_model);
    }
}
