//! Arbitrary bytes as a forward request's wire tensor.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| realm_common::fuzzing::wire(data));
