//! Arbitrary bytes as a GGUF model file: header, configuration, tokenizer, tensor data.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| realm_common::fuzzing::gguf(data));
