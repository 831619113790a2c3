//! Forward steps over long-lived `ForwardStream`s, one step in flight per stream.
//!
//! A unary `Forward` opens a new HTTP/2 stream per step: request headers, data, an
//! end-of-stream frame, then response headers, data and trailers. On an open stream a step is
//! one message each way. Each worker link keeps the streams that are between steps in a pool: a
//! step takes one (or opens one when none is idle) and gives it back once its reply is in, so a
//! lone session reuses one stream for its whole life while concurrent sessions each get their
//! own, as concurrent unary calls would.
//!
//! A stream dropped mid-step (its caller gone) is not given back: whatever the worker still sends
//! on it is never mistaken for another step's reply.
//!
//! Streams carry short steps only (decode steps): the buffers of a stream keep the size of the
//! largest message it has carried, so prefills go as unary calls, whose buffers go with them.

use std::fmt;
use std::sync::{Mutex, PoisonError};

use realm_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::{step_status, WorkerRpc};

/// One open `ForwardStream`: steps go out through `requests`, replies come back on `replies`.
struct StepStream {
    requests: mpsc::Sender<pb::ForwardRequest>,
    replies: Streaming<pb::ForwardReply>,
}

/// The streams to one worker that are between steps. Shared by the clones of a worker link.
#[derive(Default)]
pub struct StepStreams(Mutex<Vec<StepStream>>);

impl fmt::Debug for StepStreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepStreams")
            .field("idle", &self.idle().len())
            .finish()
    }
}

impl StepStreams {
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<StepStream>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one step on the worker behind `client`: on an idle stream if one is still open,
    /// else on a new one. The error is the status a unary `Forward` would have ended with.
    pub async fn forward(
        &self,
        client: &WorkerRpc,
        request: pb::ForwardRequest,
    ) -> Result<pb::ForwardResponse, Status> {
        let mut request = request;
        loop {
            let pooled = self.take();
            let fresh = pooled.is_none();
            let mut stream = match pooled {
                Some(stream) => stream,
                None => open(client).await?,
            };
            match stream.requests.send(request).await {
                Ok(()) => {}
                // The worker has closed this stream since its last step (it restarted or shut
                // down): nothing was sent, so the step goes out again on a new stream, whose
                // opening fails if the worker is gone.
                Err(mpsc::error::SendError(unsent)) if !fresh => {
                    request = unsent;
                    continue;
                }
                Err(_) => return Err(Status::unavailable("the worker closed the step stream")),
            }
            let reply = match stream.replies.message().await {
                Ok(Some(reply)) => reply,
                Ok(None) => {
                    return Err(Status::unavailable(
                        "the worker ended the step stream without replying",
                    ))
                }
                Err(status) => return Err(status),
            };
            self.idle().push(stream);
            return match reply.result {
                Some(pb::forward_reply::Result::Response(response)) => Ok(response),
                Some(pb::forward_reply::Result::Error(e)) => Err(step_status(e)),
                None => Err(Status::internal("the worker sent an empty step reply")),
            };
        }
    }

    /// An idle stream whose worker side may still be open.
    fn take(&self) -> Option<StepStream> {
        let mut idle = self.idle();
        while let Some(stream) = idle.pop() {
            if !stream.requests.is_closed() {
                return Some(stream);
            }
        }
        None
    }
}

async fn open(client: &WorkerRpc) -> Result<StepStream, Status> {
    let (requests, outgoing) = mpsc::channel(1);
    let replies = client
        .clone()
        .forward_stream(ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    Ok(StepStream { requests, replies })
}
