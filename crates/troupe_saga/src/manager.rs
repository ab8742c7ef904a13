//! [`Sagas`]: registered workflows and running instances.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::FutureExt;
use ractor::ActorRef;
use serde::Deserialize;
use serde_json::Value;
use troupe_journal::{Journal, NewEvent, PersistenceId, now_ms};

use crate::definition::SagaDefinition;
use crate::error::SagaError;
use crate::handler::Handlers;
use crate::saga::{Replayed, SagaActor, SagaArgs, SagaEvent, SagaMsg, SagaStatus, replay};

/// A request to start an instance, as it arrives over HTTP.
#[derive(Debug, Clone, Deserialize)]
pub struct StartRequest {
    /// Registered workflow name.
    pub definition: String,
    /// Its input.
    #[serde(default)]
    pub input: Value,
}

/// Most sagas running at once unless [`Sagas::with_max_running`] says otherwise.
pub const DEFAULT_MAX_RUNNING: usize = 10_000;

/// Largest JSON start request accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Workflows by name, and the saga actors running them.
#[derive(Clone)]
pub struct Sagas {
    inner: Arc<Inner>,
}

struct Inner {
    definitions: RwLock<HashMap<String, Arc<SagaDefinition>>>,
    handlers: Arc<Handlers>,
    journal: Arc<dyn Journal>,
    running: Mutex<HashMap<String, ActorRef<SagaMsg>>>,
    /// Ids being spawned: a resume and a start racing for one id spawn it once.
    starting: Mutex<std::collections::HashSet<String>>,
    next: AtomicU64,
    max_running: std::sync::atomic::AtomicUsize,
    ended: tokio::sync::broadcast::Sender<SagaStatus>,
    timers: std::sync::OnceLock<troupe_actor::Timers>,
}

impl Sagas {
    /// A registry journaling into `journal`, running `handlers`.
    pub fn new(journal: Arc<dyn Journal>, handlers: Handlers) -> Self {
        Self {
            inner: Arc::new(Inner {
                definitions: RwLock::default(),
                handlers: Arc::new(handlers),
                journal,
                running: Mutex::default(),
                starting: Mutex::default(),
                next: AtomicU64::new(1),
                max_running: std::sync::atomic::AtomicUsize::new(DEFAULT_MAX_RUNNING),
                ended: tokio::sync::broadcast::channel(1024).0,
                timers: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Signal deadlines on durable timers: a deadline fires at its time
    /// even if the saga is not running then (it is resumed to take it).
    /// Sagas started before this call keep timers in memory.
    pub fn with_timers(self, timers: troupe_actor::Timers) -> Self {
        let weak = Arc::downgrade(&self.inner);
        timers.register("saga", move |timer: troupe_actor::Timer| {
            let weak = weak.clone();
            async move {
                let inner = weak.upgrade().ok_or("the saga registry is gone")?;
                Sagas { inner }.deliver_deadline(timer).await
            }
            .boxed()
        });
        let _ = self.inner.timers.set(timers);
        self
    }

    async fn deliver_deadline(&self, timer: troupe_actor::Timer) -> Result<(), String> {
        #[derive(Deserialize)]
        struct Due {
            step: usize,
            attempt: u32,
        }
        let due: Due = serde_json::from_slice(&timer.payload).map_err(|e| e.to_string())?;
        let id = timer.target.key;
        if !self.is_running(&id) {
            self.resume_where(|k| k == id)
                .await
                .map_err(|e| e.to_string())?;
        }
        let actor = self
            .inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        if let Some(actor) = actor {
            actor
                .cast(SagaMsg::SignalDeadline {
                    step: due.step,
                    attempt: due.attempt,
                })
                .map_err(|e| e.to_string())?;
        }
        // Not running after a resume: it has ended, nothing is waiting.
        Ok(())
    }

    /// Sets how many sagas may run at once; `start` refuses one more with
    /// [`SagaError::Overloaded`] (sagas resumed after a restart are not refused).
    pub fn with_max_running(self, n: usize) -> Self {
        self.inner.max_running.store(n.max(1), Ordering::Relaxed);
        self
    }

    /// Registers a workflow; every handler it names must be registered.
    pub fn register(&self, def: SagaDefinition) -> Result<(), SagaError> {
        for s in def.steps() {
            let names = std::iter::once(&s.action)
                .filter(|_| s.signal.is_none())
                .chain(s.compensation.iter());
            for h in names {
                if self.inner.handlers.get(h).is_none() {
                    return Err(SagaError::UnknownHandler {
                        definition: def.name().to_owned(),
                        step: s.name.clone(),
                        handler: h.clone(),
                    });
                }
            }
        }
        self.inner
            .definitions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(def.name().to_owned(), Arc::new(def));
        Ok(())
    }

    /// Whether a workflow named `name` is registered.
    pub fn has_definition(&self, name: &str) -> bool {
        self.definition(name).is_ok()
    }

    fn definition(&self, name: &str) -> Result<Arc<SagaDefinition>, SagaError> {
        self.inner
            .definitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| SagaError::UnknownDefinition(name.to_owned()))
    }

    /// Starts an instance; returns its id once its start is journaled.
    pub async fn start(&self, definition: &str, input: Value) -> Result<String, SagaError> {
        let id = self.new_id(definition, "");
        self.start_with_id(&id, definition, input).await?;
        Ok(id)
    }

    /// A fresh instance id for `definition`: `{definition}-{scope}{ms}-{n}`.
    /// Processes that share a journal pass distinct scopes (a cluster
    /// passes its node name and a dash).
    pub fn new_id(&self, definition: &str, scope: &str) -> String {
        format!(
            "{definition}-{scope}{}-{}",
            now_ms(),
            self.inner.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Starts an instance under `id` (from [`Sagas::new_id`]); returns once
    /// its start is journaled. An id already used is refused (the journal's
    /// `SeqConflict`).
    pub async fn start_with_id(
        &self,
        id: &str,
        definition: &str,
        input: Value,
    ) -> Result<(), SagaError> {
        let def = self.definition(definition)?;
        let running = self.running();
        if running >= self.inner.max_running.load(Ordering::Relaxed) {
            return Err(SagaError::Overloaded { running });
        }
        let id = id.to_owned();
        let pid =
            PersistenceId::new("saga", &id).map_err(|e| SagaError::Malformed(e.to_string()))?;
        let started = NewEvent::new(&SagaEvent::Started {
            definition: definition.to_owned(),
            input,
        })
        .map_err(SagaError::from)?;
        self.inner
            .journal
            .append(&pid, 0, vec![started])
            .await
            .map_err(SagaError::from)?;
        metrics::counter!("troupe_sagas_started_total").increment(1);
        self.spawn(id, def).await?;
        Ok(())
    }

    /// Starts an instance from a JSON body `{"definition": ..., "input": ...}`.
    pub async fn start_json(&self, body: &[u8]) -> Result<String, SagaError> {
        if body.len() > MAX_REQUEST_BYTES {
            return Err(SagaError::Malformed(format!(
                "body of {} bytes exceeds {MAX_REQUEST_BYTES}",
                body.len()
            )));
        }
        let req: StartRequest =
            serde_json::from_slice(body).map_err(|e| SagaError::Malformed(e.to_string()))?;
        self.start(&req.definition, req.input).await
    }

    /// Whether saga `id` runs (or is being started) here. A saga waiting
    /// for a signal runs; one that has ended (or was stopped) does not.
    pub fn is_running(&self, id: &str) -> bool {
        // Lock order: `starting`, then `running` (as in `spawn`).
        let starting = self
            .inner
            .starting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        starting.contains(id)
            || self
                .inner
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(id)
    }

    /// Spawns the actor of saga `id` unless it runs here already; returns
    /// whether it spawned one.
    async fn spawn(&self, id: String, def: Arc<SagaDefinition>) -> Result<bool, SagaError> {
        {
            let mut starting = self
                .inner
                .starting
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let running = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
            if running.contains_key(&id) || !starting.insert(id.clone()) {
                return Ok(false);
            }
        }
        let spawned = self.spawn_actor(id.clone(), def).await;
        self.inner
            .starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        spawned.map(|()| true)
    }

    async fn spawn_actor(&self, id: String, def: Arc<SagaDefinition>) -> Result<(), SagaError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let args = SagaArgs {
            id: id.clone(),
            definition: def,
            handlers: self.inner.handlers.clone(),
            journal: self.inner.journal.clone(),
            on_end: Some(tx),
            timers: self.inner.timers.get().cloned(),
        };
        // A saga that ends before it is registered below still removes
        // itself: the channel keeps its end notice for the forwarder.
        let (actor, _) = ractor::Actor::spawn(None, SagaActor, args)
            .await
            .map_err(|e| SagaError::NotRunning(format!("{id}: {e}")))?;
        self.inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), actor.clone());
        let inner = self.inner.clone();
        let incarnation = actor.get_id();
        tokio::spawn(async move {
            let ended = rx.recv().await;
            // Ended, or failed (its journal failed): either way it is no
            // longer running, and `resume_all` may pick a failed one up.
            // (Unless a later incarnation of the same id runs already.)
            let mut running = inner.running.lock().unwrap_or_else(|p| p.into_inner());
            if running.get(&id).map(|a| a.get_id()) == Some(incarnation) {
                running.remove(&id);
            }
            drop(running);
            match ended {
                Some(status) => {
                    let _ = inner.ended.send(status);
                }
                None => {
                    tracing::error!(saga = %id, "saga actor failed; resume it with `resume_all`")
                }
            }
        });
        Ok(())
    }

    /// Resumes every unfinished saga in the journal (after a restart).
    /// Returns how many were resumed.
    pub async fn resume_all(&self) -> Result<usize, SagaError> {
        self.resume_where(|_| true).await
    }

    /// Resumes the unfinished sagas whose id matches `which` and that are
    /// not running here. A cluster node calls it for the sagas it comes to
    /// own. Returns how many were resumed.
    pub async fn resume_where(&self, which: impl Fn(&str) -> bool) -> Result<usize, SagaError> {
        let mut after: Option<PersistenceId> = None;
        let (mut resumed, mut failed) = (0, 0);
        loop {
            let page = self
                .inner
                .journal
                .persistence_ids(after.as_ref(), 1000)
                .await
                .map_err(SagaError::from)?;
            let Some(last) = page.last().cloned() else {
                break;
            };
            for pid in page
                .into_iter()
                .filter(|p| p.kind() == "saga" && which(p.key()))
            {
                let id = pid.key().to_owned();
                if self.is_running(&id) {
                    continue;
                }
                // One saga that cannot be resumed (an unknown workflow, a
                // corrupt journal) does not hold back the others.
                let resume = async {
                    let Some(status) = self.load(&id).await? else {
                        return Ok(false);
                    };
                    if status.phase.is_final() {
                        return Ok(false);
                    }
                    let def = self.definition(&status.definition)?;
                    self.spawn(id.clone(), def).await
                };
                match resume.await {
                    Ok(true) => resumed += 1,
                    Ok(false) => {}
                    Err(e) => {
                        failed += 1;
                        tracing::error!(saga = %id, error = %e, "saga not resumed");
                    }
                }
            }
            after = Some(last);
        }
        if failed > 0 {
            tracing::warn!(resumed, failed, "some sagas could not be resumed");
        }
        Ok(resumed)
    }

    async fn load(&self, id: &str) -> Result<Option<SagaStatus>, SagaError> {
        let pid =
            PersistenceId::new("saga", id).map_err(|_| SagaError::UnknownSaga(id.to_owned()))?;
        // One read, with room for the largest workflow: the journal names
        // its workflow, whose length then trims the step states.
        let Some(replayed) = replay(&*self.inner.journal, &pid, MAX_PROBE_STEPS).await? else {
            return Ok(None);
        };
        let def = self.definition(&replayed.definition)?;
        let error = replayed.error_for(&def);
        let Replayed {
            definition: def_name,
            mut steps,
            phase,
            ..
        } = replayed;
        if steps[def.steps().len()..]
            .iter()
            .any(|s| *s != crate::saga::StepState::Pending)
        {
            return Err(SagaError::Corrupt {
                id: id.to_owned(),
                message: format!(
                    "names steps past the {} of workflow `{def_name}`",
                    def.steps().len()
                ),
            });
        }
        steps.truncate(def.steps().len());
        Ok(Some(SagaStatus {
            id: id.to_owned(),
            definition: def_name,
            phase,
            steps: def
                .steps()
                .iter()
                .map(|s| s.name.clone())
                .zip(steps)
                .collect(),
            error,
        }))
    }

    /// The status of a saga, running or finished.
    pub async fn status(&self, id: &str) -> Result<SagaStatus, SagaError> {
        let actor = self
            .inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        if let Some(actor) = actor
            && let Ok(ractor::rpc::CallResult::Success(s)) = actor
                .call(SagaMsg::Status, Some(Duration::from_secs(10)))
                .await
        {
            return Ok(s);
        }
        self.load(id)
            .await?
            .ok_or_else(|| SagaError::UnknownSaga(id.to_owned()))
    }

    /// Delivers signal `name`; true if a step of the saga was waiting for it.
    pub async fn signal(&self, id: &str, name: &str, payload: Value) -> Result<bool, SagaError> {
        let actor = self
            .inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| SagaError::NotRunning(id.to_owned()))?;
        match actor
            .call(
                |r| SagaMsg::Signal(name.to_owned(), payload, r),
                Some(Duration::from_secs(10)),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(b)) => Ok(b),
            _ => Err(SagaError::NotRunning(id.to_owned())),
        }
    }

    /// Waits until saga `id` ends (or `timeout` passes) and returns its status.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<SagaStatus, SagaError> {
        let mut ended = self.inner.ended.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.status(id).await?;
            if status.phase.is_final() {
                return Ok(status);
            }
            match tokio::time::timeout_at(deadline, ended.recv()).await {
                Err(_) => return self.status(id).await,
                Ok(Ok(s)) if s.id == id => return Ok(s),
                Ok(_) => {}
            }
        }
    }

    /// The ids of the sagas running now, in no order.
    pub fn running_ids(&self) -> Vec<String> {
        self.inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Sagas running now.
    pub fn running(&self) -> usize {
        self.inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Stops every running saga actor (their journals keep their state).
    pub async fn stop_all(&self) {
        self.stop_where(|_| true).await;
    }

    /// Stops the running saga actors whose id matches `which` (their
    /// journals keep their state; another process may resume them).
    /// Returns how many it stopped.
    pub async fn stop_where(&self, which: impl Fn(&str) -> bool) -> usize {
        // A saga being spawned right now would be registered after the
        // drain: wait for such spawns first (each takes an actor start;
        // bounded, in case one hangs).
        for _ in 0..STOP_WAIT_ROUNDS {
            let spawning = self
                .inner
                .starting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|id| which(id));
            if !spawning {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let actors: Vec<ActorRef<SagaMsg>> = {
            let mut running = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
            let ids: Vec<String> = running.keys().filter(|id| which(id)).cloned().collect();
            ids.iter().filter_map(|id| running.remove(id)).collect()
        };
        let n = actors.len();
        for a in actors {
            let _ = a.stop_and_wait(None, Some(Duration::from_secs(10))).await;
        }
        n
    }
}

/// `stop_where` waits at most this many 10 ms rounds for spawns under way.
const STOP_WAIT_ROUNDS: u32 = 500;

/// Step slots used to read a journal's header before the definition is known.
const MAX_PROBE_STEPS: usize = crate::definition::MAX_STEPS;
