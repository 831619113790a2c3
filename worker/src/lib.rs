//! Realm's worker. It serves a contiguous range of transformer blocks over gRPC once the cluster
//! protocol lands; the blocks themselves live in `realm_common::model`.
#![forbid(unsafe_code)]
