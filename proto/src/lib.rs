//! Realm's wire types, generated from `realm/v1/*.proto`: the worker service the coordinator
//! drives and the client service users call. Nothing but the generated code lives here; domain
//! conversions are in `realm-common`.
#![forbid(unsafe_code)]

/// Package `realm.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("realm.v1");
}

/// Version of the worker protocol; peers with different values refuse each other.
pub const PROTOCOL_VERSION: u32 = 5;

/// Encoded descriptor set of the services, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/realm_descriptor.bin"));
