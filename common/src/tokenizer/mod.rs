//! Tokenizers built from GGUF metadata (placeholder until the tokenizer lands).
