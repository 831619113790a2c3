//! Shared helpers for Realm's end-to-end tests.
