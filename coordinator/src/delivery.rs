//! Shard delivery: a worker without the model file receives the tensors of its layers from the
//! coordinator, which holds the model.
//!
//! A worker's cache finds a shard by the model's identity and the layer range; when it lacks the
//! shard it asks for the manifest, then names the tensors it is missing (all of them, those a
//! cut delivery did not finish, or those found damaged). The coordinator hashes the model's
//! tensors once, as shards first need them, and streams the wanted tensors in chunks of a few
//! MiB over the worker's gRPC channel: the cluster token and TLS protect it like every worker
//! call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use realm_common::gguf::GgufFile;
use realm_common::model::LayerRange;
use realm_common::shard::{digest_tensors, Digest32, ShardLayout, READ_CHUNK};
use realm_common::transfer::TransferProgress;
use realm_common::wire::ModelIdentity;
use realm_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{Error, Result};
use crate::telemetry::names;
use crate::transport::WorkerRpc;

/// Chunks read ahead of the network.
const CHUNKS_AHEAD: usize = 4;

/// The model as shards are cut from it.
#[derive(Debug)]
pub(crate) struct ShardSource {
    file: GgufFile,
    identity: ModelIdentity,
    /// SHA-256 of the model's tensors hashed so far, by name.
    digests: Mutex<HashMap<String, Digest32>>,
    threads: usize,
}

/// A shard ready to deliver: its layout and its header (the manifest).
#[derive(Debug)]
pub(crate) struct ShardOffer {
    pub range: LayerRange,
    pub layout: ShardLayout,
    pub header: Vec<u8>,
}

/// What one delivery sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Delivered {
    pub bytes: u64,
    pub tensors: u32,
    pub secs: f64,
}

impl ShardSource {
    pub fn new(file: GgufFile, identity: ModelIdentity) -> Self {
        Self {
            file,
            identity,
            digests: Mutex::new(HashMap::new()),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    /// The shard of `range`, with the digests of its tensors (hashed now if they were not yet).
    pub async fn offer(self: &Arc<Self>, range: LayerRange) -> Result<Arc<ShardOffer>> {
        let source = Arc::clone(self);
        tokio::task::spawn_blocking(move || source.offer_blocking(range))
            .await
            .map_err(|e| Error::Internal(format!("hashing the shard's tensors failed: {e}")))?
    }

    fn offer_blocking(&self, range: LayerRange) -> Result<Arc<ShardOffer>> {
        let layout = ShardLayout::of(&self.file, &self.identity, range)?;
        let known = |name: &str| {
            self.digests
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(name)
                .copied()
        };
        let unhashed: Vec<_> = layout
            .tensors()
            .iter()
            .filter(|t| known(&t.name).is_none())
            .cloned()
            .collect();
        if !unhashed.is_empty() {
            let started = Instant::now();
            let digests = digest_tensors(&self.file, &unhashed, self.threads)?;
            let bytes: u64 = unhashed.iter().map(|t| t.size).sum();
            tracing::info!(
                layers = %range,
                tensors = unhashed.len(),
                mib = bytes >> 20,
                ms = started.elapsed().as_millis() as u64,
                "hashed the shard's tensors"
            );
            let mut memo = self.digests.lock().unwrap_or_else(PoisonError::into_inner);
            for (t, digest) in unhashed.iter().zip(digests) {
                memo.insert(t.name.clone(), digest);
            }
        }
        let digests = layout
            .tensors()
            .iter()
            .map(|t| {
                known(&t.name).ok_or_else(|| Error::Internal(format!("no digest of `{}`", t.name)))
            })
            .collect::<Result<Vec<_>>>()?;
        let header = layout.header(&digests);
        Ok(Arc::new(ShardOffer {
            range,
            layout,
            header,
        }))
    }

    /// Streams the tensors `wanted` (indices into the shard's directory) of `offer` to the
    /// worker at `url`.
    pub async fn deliver(
        &self,
        client: &mut WorkerRpc,
        url: &str,
        offer: Arc<ShardOffer>,
        wanted: &[u32],
    ) -> Result<Delivered> {
        let tensors = offer.layout.tensors();
        let picked = wanted
            .iter()
            .map(|&i| tensors.get(i as usize).cloned().map(|t| (i, t)))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::Protocol {
                url: url.to_string(),
                problem: format!(
                    "it wants tensors {wanted:?} of a shard of {} tensors",
                    tensors.len()
                ),
            })?;
        let total: u64 = picked.iter().map(|(_, t)| t.size).sum();
        let range = offer.range;
        let (send, chunks) = mpsc::channel(CHUNKS_AHEAD);
        let manifest = pb::ShardDelivery {
            part: Some(pb::shard_delivery::Part::Manifest(pb::ShardManifest {
                header: offer.header.clone(),
            })),
        };
        // Cannot fail: the channel is new and has room.
        let _ = send.try_send(manifest);
        let file = self.file.clone();
        let what = format!("sending layers {range} to {url}");
        // Chunks are slices of the file's mapping, copied once, into the message sent. Each
        // tensor's pages are given back once it is sent, so delivering a model does not leave it
        // resident in the coordinator.
        let reader = tokio::task::spawn_blocking(move || -> Result<Delivered> {
            let mut progress = TransferProgress::new(what, total);
            let mut sent = 0u64;
            for (index, t) in &picked {
                let data = file.tensor_data(t)?;
                let mut offset = 0usize;
                while offset < data.bytes().len() {
                    let part = data.part(offset, READ_CHUNK);
                    let n = part.bytes().len();
                    let chunk = pb::ShardDelivery {
                        part: Some(pb::shard_delivery::Part::Chunk(pb::TensorChunk {
                            tensor: *index,
                            offset: offset as u64,
                            data: bytes::Bytes::from_owner(part),
                        })),
                    };
                    if send.blocking_send(chunk).is_err() {
                        // The call ended (the worker refused or went away): its status says why.
                        progress.abandon();
                        return Ok(Delivered {
                            bytes: sent,
                            tensors: 0,
                            secs: 0.0,
                        });
                    }
                    offset += n;
                    sent += n as u64;
                    progress.advance(n as u64);
                }
                if let Err(e) = file.release_tensor(t) {
                    tracing::debug!(tensor = %t.name, error = %e, "cannot release mapped pages");
                }
            }
            let secs = progress.finish();
            Ok(Delivered {
                bytes: sent,
                tensors: picked.len() as u32,
                secs,
            })
        });
        let reply = client.deliver_shard(ReceiverStream::new(chunks)).await;
        let read = reader
            .await
            .map_err(|e| Error::Internal(format!("reading the shard's tensors failed: {e}")))?;
        let reply = reply.map_err(|status| Error::Worker {
            url: url.to_string(),
            status,
        })?;
        let delivered = read?;
        let reply = reply.into_inner();
        metrics::counter!(names::SHARD_BYTES_SENT, "worker" => url.to_string())
            .increment(delivered.bytes);
        if !reply.complete {
            return Err(Error::Protocol {
                url: url.to_string(),
                problem: format!(
                    "after receiving {} tensors ({} bytes) it still lacks part of layers {range}",
                    reply.tensors_received, reply.bytes_received
                ),
            });
        }
        Ok(delivered)
    }
}
