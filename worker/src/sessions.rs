//! The live sessions of one shard: each session's KV cache for the shard's blocks, keyed by the
//! coordinator's session id.
//!
//! Sessions are independent: each sits behind its own async mutex, held for the whole of a step
//! (so a session runs one step at a time, in order), while other sessions' steps run
//! concurrently. The map itself is only touched briefly, never across an await. A session is
//! removed from the map when it is ended, when it has been idle too long, or when a step fails
//! midway (its cache may then hold some layers' keys for the step and not others); a step that
//! got hold of a session just before its removal sees the `ended` flag and does not use it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use realm_common::kv::SessionKv;
use tokio::sync::{Mutex, OwnedMutexGuard};
use tracing::{debug, info};

/// Why a step could not get its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StepError {
    /// A step after the first names a session this worker does not hold.
    Unknown { position: usize },
    /// The step's position is not the number of tokens the session has cached.
    Position { position: usize, cached: usize },
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unknown { position } => write!(
                f,
                "unknown session: a step at position {position} needs a session this worker \
                 holds (it may have ended or expired; restart it at position 0)"
            ),
            Self::Position { position, cached } => write!(
                f,
                "position {position} does not follow the {cached} tokens this session has cached"
            ),
        }
    }
}

/// One session's state on this worker.
#[derive(Debug)]
pub(crate) struct Session {
    /// The KV cache; locked for the whole of a step.
    kv: Arc<Mutex<SessionKv>>,
    /// Set once the session has left the map. Set by the idle sweep only while it holds `kv`,
    /// and checked by a step right after it locks `kv`, so a step never runs on an expired cache.
    ended: AtomicBool,
    /// Milliseconds since the owning [`Sessions`]' epoch of the last step's start or end.
    last_used_ms: AtomicU64,
    /// Bytes held by the cache after the last step (read without locking it).
    kv_bytes: AtomicU64,
}

impl Session {
    fn new(n_layers: usize, now_ms: u64) -> Self {
        Self {
            kv: Arc::new(Mutex::new(SessionKv::new(n_layers))),
            ended: AtomicBool::new(false),
            last_used_ms: AtomicU64::new(now_ms),
            kv_bytes: AtomicU64::new(0),
        }
    }
}

/// The sessions of one shard.
#[derive(Debug)]
pub(crate) struct Sessions {
    map: DashMap<String, Arc<Session>>,
    /// Blocks in the shard, hence layers in every session's cache.
    n_layers: usize,
    epoch: Instant,
}

/// A session locked for one step. Dropping it releases the session.
pub(crate) struct Step {
    pub kv: OwnedMutexGuard<SessionKv>,
    session: Arc<Session>,
}

impl Sessions {
    pub fn new(n_layers: usize) -> Self {
        Self {
            map: DashMap::new(),
            n_layers,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Locks session `id` for a step whose first token sits at `position`, waiting for the
    /// session's step in flight, if any. Position 0 creates the session, or restarts it with an
    /// empty cache; any other position must be the number of tokens cached.
    pub async fn begin_step(&self, id: &str, position: usize) -> Result<Step, StepError> {
        loop {
            let session = if position == 0 {
                let entry = self.map.entry(id.to_string()).or_insert_with(|| {
                    debug!(session = %id, "session started");
                    Arc::new(Session::new(self.n_layers, self.now_ms()))
                });
                Arc::clone(entry.value())
            } else {
                let entry = self.map.get(id).ok_or(StepError::Unknown { position })?;
                Arc::clone(entry.value())
            };
            session.last_used_ms.store(self.now_ms(), Ordering::Relaxed);
            let mut kv = Arc::clone(&session.kv).lock_owned().await;
            if session.ended.load(Ordering::Acquire) {
                // Ended while this step waited. A first step starts the session afresh (the next
                // lookup finds no entry, or a newer one); a later step has lost its cache.
                self.remove_if_same(id, &session);
                if position == 0 {
                    continue;
                }
                return Err(StepError::Unknown { position });
            }
            if position == 0 {
                if !kv.is_empty() {
                    debug!(session = %id, cached = kv.len(), "session restarted at position 0");
                    *kv = SessionKv::new(self.n_layers);
                    session.kv_bytes.store(0, Ordering::Relaxed);
                }
            } else if kv.len() != position {
                return Err(StepError::Position {
                    position,
                    cached: kv.len(),
                });
            }
            return Ok(Step { kv, session });
        }
    }

    /// Records a completed step: the cache's new size and the time.
    pub fn finish_step(&self, step: &Step) {
        let bytes = u64::try_from(step.kv.bytes()).unwrap_or(u64::MAX);
        step.session.kv_bytes.store(bytes, Ordering::Relaxed);
        step.session
            .last_used_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    /// Drops the session of a failed step: its cache may hold the step for some layers only.
    /// Called while the step still holds the session, so no other step sees the broken cache.
    pub fn discard(&self, id: &str, step: &Step) {
        step.session.ended.store(true, Ordering::Release);
        self.remove_if_same(id, &step.session);
    }

    /// Ends session `id`; whether it existed. A step already running on it completes, but the
    /// session's next step finds it gone.
    pub fn end(&self, id: &str) -> bool {
        match self.map.remove(id) {
            Some((_, session)) => {
                session.ended.store(true, Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// Removes `id` only if it is still `session` (and not a newer session of the same id).
    fn remove_if_same(&self, id: &str, session: &Arc<Session>) {
        self.map.remove_if(id, |_, s| Arc::ptr_eq(s, session));
    }

    /// Frees sessions idle for longer than `timeout`; returns how many. A session in the middle
    /// of a step is never idle, however long the step takes.
    pub fn expire_idle(&self, timeout: Duration) -> usize {
        let now = self.now_ms();
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut expired = 0;
        self.map.retain(|id, session| {
            let idle_ms = now.saturating_sub(session.last_used_ms.load(Ordering::Relaxed));
            if idle_ms <= timeout_ms {
                return true;
            }
            // Holding the lock while setting the flag: a step that locks the session later
            // sees it ended, and one that holds it now keeps the session.
            let Ok(_kv) = session.kv.try_lock() else {
                return true;
            };
            session.ended.store(true, Ordering::Release);
            expired += 1;
            info!(session = %id, idle_ms, "session expired");
            false
        });
        expired
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes held by the KV caches of all sessions (as of their last completed steps).
    pub fn kv_bytes(&self) -> u64 {
        self.map
            .iter()
            .map(|s| s.kv_bytes.load(Ordering::Relaxed))
            .fold(0, u64::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYERS: usize = 2;

    #[tokio::test]
    async fn the_first_step_creates_a_session_and_later_ones_need_it() {
        let sessions = Sessions::new(LAYERS);
        assert_eq!(
            sessions.begin_step("a", 3).await.err(),
            Some(StepError::Unknown { position: 3 })
        );
        let step = sessions.begin_step("a", 0).await.unwrap();
        assert_eq!(step.kv.n_layers(), LAYERS);
        sessions.finish_step(&step);
        drop(step);
        assert_eq!(sessions.len(), 1);
        assert_eq!(
            sessions.begin_step("a", 1).await.err(),
            Some(StepError::Position {
                position: 1,
                cached: 0
            })
        );
        // A refused step leaves the session as it was.
        assert_eq!(sessions.len(), 1);
        assert!(sessions.begin_step("a", 0).await.is_ok());
    }

    #[tokio::test]
    async fn ending_frees_and_reports_whether_the_session_existed() {
        let sessions = Sessions::new(LAYERS);
        drop(sessions.begin_step("a", 0).await.unwrap());
        assert!(sessions.end("a"));
        assert!(!sessions.end("a"));
        assert_eq!(sessions.len(), 0);
        assert_eq!(
            sessions.begin_step("a", 5).await.err(),
            Some(StepError::Unknown { position: 5 })
        );
    }

    #[tokio::test]
    async fn a_session_runs_one_step_at_a_time() {
        let sessions = Arc::new(Sessions::new(LAYERS));
        let first = sessions.begin_step("a", 0).await.unwrap();
        let waiting = tokio::spawn({
            let sessions = Arc::clone(&sessions);
            async move { sessions.begin_step("a", 0).await.map(|_| ()) }
        });
        // Another session is not held up.
        drop(sessions.begin_step("b", 0).await.unwrap());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished());
        drop(first);
        assert_eq!(waiting.await.unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn a_first_step_waiting_on_an_ended_session_starts_a_new_one() {
        let sessions = Arc::new(Sessions::new(LAYERS));
        let first = sessions.begin_step("a", 0).await.unwrap();
        let waiting = tokio::spawn({
            let sessions = Arc::clone(&sessions);
            async move { sessions.begin_step("a", 0).await.map(|_| ()) }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(sessions.end("a"));
        drop(first);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert_eq!(sessions.len(), 1);
    }

    #[tokio::test]
    async fn a_failed_step_drops_its_session() {
        let sessions = Sessions::new(LAYERS);
        let step = sessions.begin_step("a", 0).await.unwrap();
        sessions.discard("a", &step);
        drop(step);
        assert_eq!(sessions.len(), 0);
        assert!(!sessions.end("a"));
    }

    #[tokio::test]
    async fn idle_sessions_expire_but_busy_ones_do_not() {
        let sessions = Sessions::new(LAYERS);
        drop(sessions.begin_step("idle", 0).await.unwrap());
        let busy = sessions.begin_step("busy", 0).await.unwrap();
        assert_eq!(sessions.expire_idle(Duration::from_secs(3600)), 0);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(sessions.expire_idle(Duration::ZERO), 1);
        assert_eq!(sessions.len(), 1);
        assert!(!sessions.end("idle"));
        drop(busy);
        assert_eq!(sessions.expire_idle(Duration::ZERO), 1);
        assert_eq!(sessions.len(), 0);
    }
}
