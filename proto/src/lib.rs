//! Realm's wire types. The gRPC services arrive with the distributed cluster; until then this crate
//! only reserves its place in the workspace.
#![forbid(unsafe_code)]
