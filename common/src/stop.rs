//! Stop strings (placeholder).
