//! The client API: the `realm.v1.Realm` gRPC service over the [`Models`] served, with gRPC
//! health and server reflection on the same port, and the `realm.v1.Admin` service that adds and
//! removes models (behind the cluster token).
//!
//! `Generate` validates the request before it answers (a bad request is an error status, not a
//! stream that fails), then runs it through [`generation`] (shared with the HTTP API): one
//! message per generated token, and a last one with the finish reason and usage. When the client
//! goes away the stream is dropped and the generation stops and ends the session on every worker.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use realm_common::auth::{RequireBearer, Secret};
use realm_common::chat::DEFAULT_SYSTEM_PROMPT;
use realm_common::generate::{GenerationParams, DEFAULT_MAX_TOKENS};
use realm_common::logprobs::{TokenLogprob, MAX_TOP_LOGPROBS};
use realm_common::sampling::SamplingParams;
use realm_common::stop::StopMatcher;
use realm_common::tokenizer::Tokenizer;
use realm_proto::pb;
use realm_proto::pb::admin_server::{Admin, AdminServer};
use realm_proto::pb::realm_server::{Realm, RealmServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::ServerTlsConfig;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::generation::{self, Event, Job};
use crate::models::{Models, Served};
use crate::net::MAX_MESSAGE_BYTES;
use crate::plan::PlanSpec;
use crate::request_id::RequestId;

/// Fully-qualified name of the client service, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "realm.v1.Realm";
const REFLECTION_SERVICE_NAME: &str = "grpc.reflection.v1.ServerReflection";

/// Who may use the client API and the admin API.
#[derive(Debug, Clone, Default)]
pub struct ServiceOptions {
    /// API keys accepted; empty admits any client.
    pub api_keys: Vec<Secret>,
    /// The cluster token the admin API requires; `None` refuses every admin call.
    pub admin_token: Option<Secret>,
    /// TLS for the listener; `None` serves plaintext.
    pub tls: Option<ServerTlsConfig>,
}

/// The `Realm` service over the models served.
#[derive(Debug, Clone)]
pub struct RealmService {
    models: Arc<Models>,
}

impl RealmService {
    pub fn new(models: Arc<Models>) -> Self {
        Self { models }
    }
}

/// The generation a `Generate` request asks of `served`, checked.
fn job(
    served: &Served,
    req: &pb::GenerateRequest,
    received: Instant,
    id: RequestId,
) -> Result<Job> {
    if req.prompt.is_empty() {
        return Err(realm_common::Error::InvalidArgument("the prompt is empty".into()).into());
    }
    let params = generation_params(req)?;
    let tokens = served
        .cluster
        .model()
        .prompt_tokens(&req.prompt, chat_system(req))?;
    Ok(Job {
        tokens,
        params,
        received,
        id,
        api: API,
        logprobs: logprobs_of(req)?,
    })
}

/// The `api` label of this service's requests in the metrics.
const API: &str = crate::telemetry::api::GRPC;

/// A model's entry in `ListModels` (and the admin API's answers).
pub fn model_info(cluster: &Cluster) -> pb::ModelInfo {
    let model = cluster.model();
    pb::ModelInfo {
        id: model.id.clone(),
        architecture: model.identity.architecture.clone(),
        n_layers: model.config.n_layers as u32,
        context_length: model.config.context_length as u32,
        plan: cluster.plan().to_string(),
    }
}

/// The generation parameters of a request, checked: meaningless sampling values and empty stop
/// strings are refused here, before any work starts.
pub fn generation_params(req: &pb::GenerateRequest) -> Result<GenerationParams> {
    let max_tokens = match req.max_tokens {
        0 => DEFAULT_MAX_TOKENS,
        n => n as usize,
    };
    let sampling = SamplingParams {
        temperature: req.temperature,
        top_k: req.top_k as usize,
        top_p: req.top_p.unwrap_or(1.0),
        repetition_penalty: req.repetition_penalty.unwrap_or(1.0),
        presence_penalty: req.presence_penalty.unwrap_or(0.0),
        frequency_penalty: req.frequency_penalty.unwrap_or(0.0),
        seed: req.seed,
        ..SamplingParams::default()
    };
    sampling.validate()?;
    StopMatcher::new(req.stop.clone())?;
    Ok(GenerationParams {
        max_tokens,
        sampling,
        stop: req.stop.clone(),
    })
}

/// How many alternatives a request's log-probabilities report, if it asks for them.
fn logprobs_of(req: &pb::GenerateRequest) -> Result<Option<usize>> {
    let top = req.top_logprobs as usize;
    let invalid = |m: String| Err(realm_common::Error::InvalidArgument(m).into());
    if top > MAX_TOP_LOGPROBS {
        return invalid(format!(
            "top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {top}"
        ));
    }
    if !req.logprobs && top > 0 {
        return invalid("top_logprobs needs logprobs".to_string());
    }
    Ok(req.logprobs.then_some(top))
}

/// The wire form of a token's log-probability; alternatives are named by their bytes, control
/// tokens by their text.
pub fn wire_logprob(tokenizer: &Tokenizer, entry: &TokenLogprob) -> pb::TokenLogprob {
    pb::TokenLogprob {
        token_id: entry.token,
        bytes: entry.bytes.clone(),
        logprob: entry.logprob,
        top_logprobs: entry
            .top
            .iter()
            .map(|t| pb::TopLogprob {
                token_id: t.token,
                bytes: tokenizer.token_bytes(t.token, true).unwrap_or_default(),
                logprob: t.logprob,
            })
            .collect(),
    }
}

/// The system message of a chat request: unset is Realm's default, empty is none.
fn chat_system(req: &pb::GenerateRequest) -> Option<&str> {
    req.chat
        .then(|| req.system.as_deref().unwrap_or(DEFAULT_SYSTEM_PROMPT))
}

#[tonic::async_trait]
impl Realm for RealmService {
    type GenerateStream =
        Pin<Box<dyn Stream<Item = std::result::Result<pb::GenerateResponse, Status>> + Send>>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> std::result::Result<Response<Self::GenerateStream>, Status> {
        let received = Instant::now();
        let id = RequestId::from_metadata(request.metadata());
        let req = request.into_inner();
        let span = id.span();
        let refused = |e: &Error, model: &str| {
            let _in = span.enter();
            debug!(error = %e, "generate refused");
            generation::count_refused(API, model);
        };
        // Refused before its model is known, the request counts under no model.
        let served = self
            .models
            .get(&req.model)
            .inspect_err(|e| refused(e, ""))?;
        let refused = |e: &Error| refused(e, served.id());
        let job = span
            .in_scope(|| job(&served, &req, received, id.clone()))
            .inspect_err(refused)?;
        // Checked before queueing, so a bad request never waits for a slot.
        let slot = served.admission.admit().await.inspect_err(refused)?;
        let events = span.in_scope(|| generation::start(&served.cluster, job, slot))?;
        let tokenizer = served.cluster.model().tokenizer.clone();
        let stream = UnboundedReceiverStream::new(events).map(move |event| match event {
            Event::Delta(delta) => Ok(pb::GenerateResponse {
                text: delta.text,
                token_ids: vec![delta.token],
                finish: None,
                logprobs: delta
                    .logprobs
                    .iter()
                    .map(|e| wire_logprob(&tokenizer, e))
                    .collect(),
            }),
            Event::Done(done) => {
                let c = &done.completion;
                Ok(pb::GenerateResponse {
                    text: String::new(),
                    token_ids: Vec::new(),
                    finish: Some(pb::Finish {
                        reason: c.finish.as_str().to_string(),
                        usage: Some(pb::Usage {
                            prompt_tokens: c.usage.prompt_tokens as u32,
                            generated_tokens: c.usage.generated_tokens as u32,
                            time_to_first_token_ms: done.time_to_first_token.as_secs_f64() * 1e3,
                            tokens_per_second: c.usage.decode_tokens_per_second(),
                        }),
                    }),
                    logprobs: Vec::new(),
                })
            }
            Event::Failed(e) => Err(Status::from(e)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> std::result::Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.into_inner();
        let served = self.models.get(&req.model)?;
        let token_ids = served
            .cluster
            .model()
            .tokenizer
            .encode(&req.text, req.add_special, req.parse_special)
            .map_err(Error::from)?;
        Ok(Response::new(pb::TokenizeResponse { token_ids }))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> std::result::Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse {
            models: self
                .models
                .all()
                .iter()
                .map(|s| model_info(&s.cluster))
                .collect(),
        }))
    }

    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> std::result::Result<Response<pb::ListWorkersResponse>, Status> {
        let mut workers = Vec::new();
        for served in self.models.all() {
            let model = served.cluster.model();
            let (id, digest) = (&model.id, &model.identity.header_sha256);
            let statuses = served.cluster.worker_status().await;
            workers.extend(statuses.into_iter().map(|(url, range, info)| match info {
                Ok(info) => {
                    let shard = info
                        .shards
                        .into_iter()
                        .find(|s| crate::topology::is_of_model(s, digest))
                        .unwrap_or_default();
                    pb::WorkerStatus {
                        url,
                        layers: range.to_string(),
                        reachable: true,
                        error: String::new(),
                        active_sessions: shard.active_sessions,
                        kv_cache_bytes: shard.kv_cache_bytes,
                        memory_available_bytes: info.memory_available_bytes,
                        layer_manager: shard.layer_manager,
                        shard_cache: info.shard_cache,
                        model: id.clone(),
                    }
                }
                Err(e) => pb::WorkerStatus {
                    url,
                    layers: range.to_string(),
                    reachable: false,
                    error: e.to_string(),
                    model: id.clone(),
                    ..Default::default()
                },
            }));
        }
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }
}

/// The `Admin` service: adds and removes models while serving.
#[derive(Debug, Clone)]
pub struct AdminService {
    models: Arc<Models>,
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn add_model(
        &self,
        request: Request<pb::AddModelRequest>,
    ) -> std::result::Result<Response<pb::AddModelResponse>, Status> {
        let req = request.into_inner();
        if req.path.is_empty() {
            return Err(Status::invalid_argument("the model's path is empty"));
        }
        let plan: PlanSpec = match req.plan.as_str() {
            "" => PlanSpec::Auto,
            spec => spec.parse()?,
        };
        info!(path = %req.path, plan = %plan, "adding a model");
        let served = self
            .models
            .add(&PathBuf::from(&req.path), &plan)
            .await
            .inspect_err(|e| warn!(path = %req.path, error = %e, "cannot add the model"))?;
        Ok(Response::new(pb::AddModelResponse {
            model: Some(model_info(&served.cluster)),
        }))
    }

    async fn remove_model(
        &self,
        request: Request<pb::RemoveModelRequest>,
    ) -> std::result::Result<Response<pb::RemoveModelResponse>, Status> {
        let req = request.into_inner();
        info!(model = %req.model, "removing a model");
        let ended = self.models.remove(&req.model).await?;
        Ok(Response::new(pb::RemoveModelResponse {
            streams_ended: u32::try_from(ended).unwrap_or(u32::MAX),
        }))
    }
}

/// Refuses every call: the admin API of a coordinator without a cluster token.
#[derive(Debug, Clone, Copy)]
struct Closed;

impl tonic::service::Interceptor for Closed {
    fn call(&mut self, _: Request<()>) -> std::result::Result<Request<()>, Status> {
        Err(Status::permission_denied(
            "the admin API needs the cluster token, and this coordinator has none: start it with \
             REALM_CLUSTER_TOKEN (or --cluster-token)",
        ))
    }
}

/// Serves the client API (with health and reflection) for `models` on `listener` until
/// `shutdown` resolves; generations in flight are then allowed to finish.
pub async fn serve(
    listener: TcpListener,
    models: Arc<Models>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_with(listener, models, ServiceOptions::default(), shutdown).await
}

/// As [`serve`], with API keys, the admin API's token and TLS.
pub async fn serve_with(
    listener: TcpListener,
    models: Arc<Models>,
    options: ServiceOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_or_else(|e| format!("unknown address ({e})"), |a| a.to_string());
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<RealmServer<RealmService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(realm_proto::FILE_DESCRIPTOR_SET)
        .with_service_name(SERVICE_NAME)
        .with_service_name(REFLECTION_SERVICE_NAME)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection service: {e}")))?;
    let admin = AdminServer::new(AdminService {
        models: Arc::clone(&models),
    });
    let realm = RealmServer::new(RealmService::new(models))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Health and reflection stay open for probes and tools; the Realm service needs a key.
    let gate = RequireBearer::new(
        &options.api_keys,
        "API key",
        "realm --api-key, or REALM_API_KEY",
    );
    let realm = InterceptedService::new(realm, gate);
    // The admin API takes the cluster token alone, never an API key.
    let (admin_open, admin_closed) = match &options.admin_token {
        Some(token) => (
            Some(InterceptedService::new(
                admin,
                RequireBearer::new(
                    std::slice::from_ref(token),
                    "cluster token",
                    "realm --cluster-token, or REALM_CLUSTER_TOKEN",
                ),
            )),
            None,
        ),
        None => (None, Some(InterceptedService::new(admin, Closed))),
    };
    info!(%addr, "serving the Realm API");
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = options.tls {
        server = server.tls_config(tls).map_err(|e| {
            Error::Internal(format!(
                "the TLS certificate or key cannot be used: {}",
                crate::net::error_chain(&e)
            ))
        })?;
    }
    let result = server
        .add_service(health)
        .add_service(reflection)
        .add_service(realm)
        .add_optional_service(admin_open)
        .add_optional_service(admin_closed)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    if let Err(e) = &result {
        warn!(error = %crate::net::error_chain(e), "server stopped with an error");
    }
    result.map_err(|e| Error::Internal(format!("gRPC server: {}", crate::net::error_chain(&e))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn request() -> pb::GenerateRequest {
        pb::GenerateRequest {
            prompt: "hi".to_string(),
            ..Default::default()
        }
    }

    fn code(r: Result<GenerationParams>) -> Code {
        Status::from(r.expect_err("should be refused")).code()
    }

    #[test]
    fn defaults_are_greedy_with_the_default_budget() {
        let p = generation_params(&request()).unwrap();
        assert_eq!(p.max_tokens, DEFAULT_MAX_TOKENS);
        assert!(p.sampling.is_greedy());
        assert_eq!(p.sampling.top_p, 1.0);
        assert_eq!(p.sampling.repetition_penalty, 1.0);
        let p = generation_params(&pb::GenerateRequest {
            max_tokens: 7,
            temperature: 0.8,
            top_k: 40,
            top_p: Some(0.9),
            repetition_penalty: Some(1.1),
            seed: Some(3),
            stop: vec!["\n\n".to_string()],
            ..request()
        })
        .unwrap();
        assert_eq!(p.max_tokens, 7);
        assert_eq!(
            (p.sampling.temperature, p.sampling.top_k, p.sampling.top_p),
            (0.8, 40, 0.9)
        );
        assert_eq!(p.sampling.seed, Some(3));
        assert_eq!(p.stop, ["\n\n"]);
    }

    #[test]
    fn meaningless_sampling_values_are_invalid_arguments() {
        let bad = [
            pb::GenerateRequest {
                temperature: -1.0,
                ..request()
            },
            pb::GenerateRequest {
                temperature: f32::NAN,
                ..request()
            },
            pb::GenerateRequest {
                top_p: Some(0.0),
                ..request()
            },
            pb::GenerateRequest {
                top_p: Some(1.5),
                ..request()
            },
            pb::GenerateRequest {
                repetition_penalty: Some(0.0),
                ..request()
            },
            pb::GenerateRequest {
                stop: vec![String::new()],
                ..request()
            },
            pb::GenerateRequest {
                presence_penalty: Some(-2.5),
                ..request()
            },
            pb::GenerateRequest {
                frequency_penalty: Some(f32::INFINITY),
                ..request()
            },
        ];
        for req in bad {
            assert_eq!(
                code(generation_params(&req)),
                Code::InvalidArgument,
                "{req:?}"
            );
        }
    }

    #[test]
    fn logprobs_are_asked_for_within_bounds() {
        assert_eq!(logprobs_of(&request()).unwrap(), None);
        let asked = pb::GenerateRequest {
            logprobs: true,
            top_logprobs: 5,
            ..request()
        };
        assert_eq!(logprobs_of(&asked).unwrap(), Some(5));
        for bad in [
            pb::GenerateRequest {
                top_logprobs: 2,
                ..request()
            },
            pb::GenerateRequest {
                top_logprobs: 21,
                ..asked.clone()
            },
        ] {
            let status = Status::from(logprobs_of(&bad).unwrap_err());
            assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
            assert!(status.message().contains("top_logprobs"), "{status}");
        }
    }

    #[test]
    fn chat_system_message_defaults_and_can_be_empty() {
        assert_eq!(chat_system(&request()), None);
        let chat = pb::GenerateRequest {
            chat: true,
            ..request()
        };
        assert_eq!(chat_system(&chat), Some(DEFAULT_SYSTEM_PROMPT));
        let none = pb::GenerateRequest {
            system: Some(String::new()),
            ..chat.clone()
        };
        assert_eq!(chat_system(&none), Some(""));
    }
}
