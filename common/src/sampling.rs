//! Token sampling (placeholder).
