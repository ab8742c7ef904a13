//! Bounded mailboxes and stable actor handles.
//!
//! ractor's mailboxes are unbounded. Troupe bounds them from the sending
//! side: every [`ActorHandle`] holds a semaphore with one permit per free
//! mailbox slot. A sender takes a permit before it enqueues; the actor gives
//! it back as it takes the message out (see [`Bounded`]). So at most
//! `capacity` messages wait in any mailbox, and the three ways to send say
//! what happens at the bound:
//!
//! | method | mailbox full | actor not running |
//! |---|---|---|
//! | [`ActorHandle::tell`] | fails at once with `Backpressure` | fails at once with `NotRunning` |
//! | [`ActorHandle::send`] | waits for room, up to a time-out | waits for a restart, up to the same time-out |
//! | [`ActorHandle::ask`] | like `send`, then waits for the reply | like `send` |
//!
//! A handle stays valid across restarts: a supervisor re-attaches the new
//! incarnation to it. Messages still queued in a crashed incarnation's
//! mailbox are lost, as in Erlang; work that must not be lost is journaled
//! or sent with `ask` and retried.
//!
//! Messages an actor sends itself through ractor (timers, `myself.cast`)
//! take no permit. While such messages and handle messages are queued
//! together, the mailbox can briefly hold up to that many messages more
//! than its capacity; the count never drifts (see the test
//! `messages_an_actor_sends_itself_do_not_corrupt_the_bound`).

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwapOption;
use ractor::{ActorCell, ActorRef, ActorStatus, Message, RpcReplyPort};
use tokio::sync::Notify;

use crate::error::{ActorError, Rejected};

/// Default mailbox capacity.
pub const DEFAULT_MAILBOX_CAPACITY: usize = 1024;

/// How often a `send` waiting for a restarted actor looks again, in case
/// the new incarnation was attached between its check and its wait.
const RESTART_POLL: Duration = Duration::from_millis(50);

/// Keeps a hot atomic on a cache line of its own.
#[repr(align(128))]
struct Padded<T>(T);

/// The slots of one incarnation's mailbox, counted like an SPSC ring:
/// senders count what they enqueued (`sent`), the actor counts what it took
/// out (`received`), each on its own cache line. A sender compares `sent`
/// with its last view of `received` and re-reads the actor's counter only
/// when that view says "full", so in the common case sender and actor never
/// write the same cache line (a shared counter would cross cores twice per
/// message).
struct Permits {
    sent: Padded<AtomicUsize>,
    received_seen: Padded<AtomicUsize>,
    received: Padded<AtomicUsize>,
    /// The actor's last view of `sent` (written by the actor only).
    sent_seen: Padded<AtomicUsize>,
    capacity: usize,
    waiters: Padded<AtomicUsize>,
    notify: Notify,
    /// Whether the actor is inside a handler now (set by the bounded
    /// wrapper around it): a message taken out of the mailbox no longer
    /// counts in `depth`, but its actor is not idle.
    busy: std::sync::atomic::AtomicBool,
}

impl Permits {
    fn new(capacity: usize) -> Self {
        Self {
            sent: Padded(AtomicUsize::new(0)),
            received_seen: Padded(AtomicUsize::new(0)),
            received: Padded(AtomicUsize::new(0)),
            sent_seen: Padded(AtomicUsize::new(0)),
            capacity,
            waiters: Padded(AtomicUsize::new(0)),
            notify: Notify::new(),
            busy: std::sync::atomic::AtomicBool::new(false),
        }
    }

    #[inline]
    fn try_acquire(&self) -> bool {
        let mut sent = self.sent.0.load(Ordering::Relaxed);
        loop {
            let mut seen = self.received_seen.0.load(Ordering::Relaxed);
            if sent.wrapping_sub(seen) >= self.capacity {
                seen = self.received.0.load(Ordering::SeqCst);
                self.received_seen.0.fetch_max(seen, Ordering::Relaxed);
                if sent.wrapping_sub(seen) >= self.capacity {
                    return false;
                }
            }
            match self.sent.0.compare_exchange_weak(
                sent,
                sent.wrapping_add(1),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => sent = now,
            }
        }
    }

    /// Takes back a slot a sender acquired but could not use.
    fn unacquire(&self) {
        self.sent.0.fetch_sub(1, Ordering::AcqRel);
    }

    /// Marks one message taken out of the mailbox. Only the actor calls
    /// this, so `received` has a single writer. Waiting senders are woken
    /// once a few slots are free, not for every slot.
    #[inline]
    fn release(&self) {
        let received = self.received.0.load(Ordering::Relaxed);
        if received == self.sent_seen.0.load(Ordering::Relaxed) {
            let sent = self.sent.0.load(Ordering::SeqCst);
            self.sent_seen.0.store(sent, Ordering::Relaxed);
            if received == sent {
                return; // a message that took no permit (sent through raw ractor)
            }
        }
        let received = received.wrapping_add(1);
        self.received.0.store(received, Ordering::SeqCst);
        if self.waiters.0.load(Ordering::SeqCst) > 0 {
            let queued = self.sent.0.load(Ordering::SeqCst).wrapping_sub(received);
            if self.capacity.saturating_sub(queued) >= self.wake_threshold() {
                self.notify.notify_waiters();
            }
        }
    }

    #[inline]
    fn wake_threshold(&self) -> usize {
        (self.capacity / 8).clamp(1, 64)
    }

    /// Waits for a slot until `deadline`; false on time-out.
    async fn acquire_until(&self, deadline: tokio::time::Instant) -> bool {
        if self.try_acquire() {
            return true;
        }
        self.waiters.0.fetch_add(1, Ordering::SeqCst);
        let got = loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.try_acquire() {
                break true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break self.try_acquire();
            }
        };
        self.waiters.0.fetch_sub(1, Ordering::SeqCst);
        got
    }

    /// Messages waiting.
    fn depth(&self) -> usize {
        let sent = self.sent.0.load(Ordering::Relaxed);
        let received = self.received.0.load(Ordering::Relaxed);
        sent.wrapping_sub(received).min(self.capacity)
    }
}

struct Incarnation<M> {
    actor: ActorRef<M>,
    permits: Arc<Permits>,
}

struct Shared<M> {
    name: String,
    capacity: usize,
    current: ArcSwapOption<Incarnation<M>>,
    attached: Notify,
    refused: metrics::Counter,
    depth: metrics::Gauge,
}

/// A bounded, restart-stable address of an actor whose messages are `M`.
pub struct ActorHandle<M> {
    shared: Arc<Shared<M>>,
}

impl<M> Clone for ActorHandle<M> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<M> std::fmt::Debug for ActorHandle<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActorHandle")
            .field("name", &self.shared.name)
            .field("capacity", &self.shared.capacity)
            .finish()
    }
}

/// What the actor side of a bounded mailbox needs: the permits to give back.
#[derive(Clone)]
pub struct MailboxPermits {
    permits: Arc<Permits>,
    depth: metrics::Gauge,
}

impl MailboxPermits {
    /// Gives back the permit of one message taken out of the mailbox.
    #[inline]
    pub fn release(&self) {
        self.permits.release();
        // Reading the senders' counter costs a cache-line transfer: sample
        // the depth gauge every 64 messages rather than every one.
        if self
            .permits
            .received
            .0
            .load(Ordering::Relaxed)
            .is_multiple_of(64)
        {
            self.depth.set(self.permits.depth() as f64);
        }
    }
}

impl<M: Message> ActorHandle<M> {
    /// A handle with no actor attached yet; its metrics carry the label
    /// `actor = name`.
    pub fn detached(name: impl Into<String>, capacity: usize) -> Self {
        let name = name.into();
        let label = name.clone();
        Self::detached_with_label(name, label, capacity)
    }

    /// A handle whose metrics are labelled `actor = label` rather than its
    /// name: actors that come and go by the thousand (entities) share their
    /// kind as a label, so the metrics backend does not get a series each.
    pub fn detached_with_label(
        name: impl Into<String>,
        label: impl Into<String>,
        capacity: usize,
    ) -> Self {
        let name = name.into();
        let label = label.into();
        let capacity = capacity.max(1);
        Self {
            shared: Arc::new(Shared {
                refused: metrics::counter!("troupe_mailbox_refused_total", "actor" => label.clone()),
                depth: metrics::gauge!("troupe_mailbox_depth", "actor" => label),
                name,
                capacity,
                current: ArcSwapOption::empty(),
                attached: Notify::new(),
            }),
        }
    }

    /// Fresh permits for a new incarnation (pass them to [`Bounded`]'s arguments).
    pub fn new_permits(&self) -> MailboxPermits {
        MailboxPermits {
            permits: Arc::new(Permits::new(self.shared.capacity)),
            depth: self.shared.depth.clone(),
        }
    }

    /// Attaches a (new) incarnation started with `permits`.
    pub fn attach(&self, actor: ActorRef<M>, permits: &MailboxPermits) {
        self.shared.current.store(Some(Arc::new(Incarnation {
            actor,
            permits: permits.permits.clone(),
        })));
        self.shared.attached.notify_waiters();
    }

    /// Detaches the current incarnation (it stopped for good).
    pub fn detach(&self) {
        self.shared.current.store(None);
    }

    /// The actor's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Mailbox capacity.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Messages waiting in the current incarnation's mailbox.
    pub fn depth(&self) -> usize {
        match &*self.shared.current.load() {
            Some(inc) => inc.permits.depth(),
            None => 0,
        }
    }

    /// Whether the current incarnation is handling a message now.
    pub fn is_busy(&self) -> bool {
        match &*self.shared.current.load() {
            Some(inc) => inc.permits.busy.load(Ordering::Acquire),
            None => false,
        }
    }

    /// The current incarnation's cell, if one is attached and alive.
    pub fn cell(&self) -> Option<ActorCell> {
        self.shared
            .current
            .load()
            .as_ref()
            .filter(|inc| running(&inc.actor))
            .map(|inc| inc.actor.get_cell())
    }

    fn not_running(&self) -> ActorError {
        ActorError::NotRunning {
            actor: self.shared.name.clone(),
        }
    }

    /// Enqueues `msg` if there is room, or fails at once.
    #[inline]
    pub fn tell(&self, msg: M) -> Result<(), Rejected<M>> {
        let guard = self.shared.current.load();
        let Some(inc) = guard.as_ref() else {
            return Err(Rejected {
                error: self.not_running(),
                message: msg,
            });
        };
        if !inc.permits.try_acquire() {
            {
                self.shared.refused.increment(1);
                return Err(Rejected {
                    error: ActorError::Backpressure {
                        actor: self.shared.name.clone(),
                        capacity: self.shared.capacity,
                    },
                    message: msg,
                });
            }
        }
        inc.actor.cast(msg).map_err(|e| {
            inc.permits.unacquire();
            Rejected {
                error: self.not_running(),
                message: take_message(e),
            }
        })
    }

    /// Enqueues `msg`, waiting up to `timeout` for room (and for a restart
    /// if the actor is down).
    pub async fn send(&self, msg: M, timeout: Duration) -> Result<(), Rejected<M>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut msg = msg;
        loop {
            let attached = self.shared.attached.notified();
            let inc = self.shared.current.load_full();
            if let Some(inc) = inc.filter(|i| running(&i.actor)) {
                if !inc.permits.acquire_until(deadline).await {
                    return Err(Rejected {
                        error: self.timeout("send", timeout),
                        message: msg,
                    });
                }
                match inc.actor.cast(msg) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        inc.permits.unacquire();
                        msg = take_message(e);
                    }
                }
            }
            // Not running: wait for the next incarnation, polling in case it
            // was attached between our load and `notified()`.
            let wait = tokio::time::sleep_until(
                (tokio::time::Instant::now() + RESTART_POLL).min(deadline),
            );
            tokio::select! {
                _ = attached => {}
                _ = wait => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Rejected {
                    error: self.timeout("send", timeout),
                    message: msg,
                });
            }
        }
    }

    fn timeout(&self, operation: &'static str, after: Duration) -> ActorError {
        ActorError::Timeout {
            actor: self.shared.name.clone(),
            operation,
            after,
        }
    }

    /// Sends the message `build` makes around a reply port and waits for the
    /// reply; `timeout` bounds the whole exchange.
    pub async fn ask<R: Send + 'static>(
        &self,
        build: impl FnOnce(RpcReplyPort<R>) -> M,
        timeout: Duration,
    ) -> Result<R, ActorError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let msg = build(RpcReplyPort::from(tx));
        let deadline = tokio::time::Instant::now() + timeout;
        // Fast path: room now.
        match self.tell(msg) {
            Ok(()) => {}
            Err(Rejected {
                error: ActorError::Backpressure { .. } | ActorError::NotRunning { .. },
                message,
            }) => self
                .send(message, timeout)
                .await
                .map_err(Rejected::into_error)?,
            Err(r) => return Err(r.error),
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(ActorError::NoReply {
                actor: self.shared.name.clone(),
            }),
            Err(_) => Err(self.timeout("ask", timeout)),
        }
    }
}

fn running<M>(actor: &ActorRef<M>) -> bool {
    matches!(
        actor.get_status(),
        ActorStatus::Starting | ActorStatus::Running | ActorStatus::Upgrading
    )
}

fn take_message<M>(e: ractor::MessagingErr<M>) -> M {
    match e {
        ractor::MessagingErr::SendErr(m) => m,
        // `cast` only fails with SendErr for a local actor; the others carry
        // no message, which cannot happen here.
        other => unreachable_message(other),
    }
}

#[cold]
fn unreachable_message<M>(e: ractor::MessagingErr<M>) -> M {
    panic!("ractor cast failed without returning the message: {e:?}")
}

/// Wraps a ractor actor so that it gives back a mailbox permit for every
/// message it takes. Spawn `Bounded(actor)` with [`BoundedArgs`].
pub struct Bounded<A>(pub A);

/// Arguments of a [`Bounded`] actor: the wrapped actor's plus the permits.
pub struct BoundedArgs<A: ractor::Actor> {
    /// The wrapped actor's arguments.
    pub inner: A::Arguments,
    /// From [`ActorHandle::new_permits`].
    pub permits: MailboxPermits,
}

/// State of a [`Bounded`] actor.
pub struct BoundedState<A: ractor::Actor> {
    /// The wrapped actor's state.
    pub inner: A::State,
    permits: MailboxPermits,
}

impl<A: ractor::Actor> ractor::Actor for Bounded<A> {
    type Msg = A::Msg;
    type State = BoundedState<A>;
    type Arguments = BoundedArgs<A>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ractor::ActorProcessingErr> {
        let inner = self.0.pre_start(myself, args.inner).await?;
        Ok(BoundedState {
            inner,
            permits: args.permits,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ractor::ActorProcessingErr> {
        self.0.post_start(myself, &mut state.inner).await
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ractor::ActorProcessingErr> {
        self.0.post_stop(myself, &mut state.inner).await
    }

    #[inline]
    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ractor::ActorProcessingErr> {
        state.permits.release();
        state.permits.permits.busy.store(true, Ordering::Relaxed);
        let handled = self.0.handle(myself, message, &mut state.inner).await;
        state.permits.permits.busy.store(false, Ordering::Release);
        handled
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        message: ractor::SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ractor::ActorProcessingErr> {
        self.0
            .handle_supervisor_evt(myself, message, &mut state.inner)
            .await
    }
}

/// Spawns `actor` with a bounded mailbox, linked to `supervisor` if given,
/// and returns its handle (metrics labelled with `name`; see
/// [`ActorHandle::detached_with_label`] for actors that come and go in
/// large numbers).
pub async fn spawn<A: ractor::Actor>(
    name: impl Into<String>,
    actor: A,
    args: A::Arguments,
    capacity: usize,
    supervisor: Option<ActorCell>,
) -> Result<ActorHandle<A::Msg>, ActorError> {
    let handle = ActorHandle::detached(name, capacity);
    start_into(&handle, actor, args, supervisor).await?;
    Ok(handle)
}

/// Starts a new incarnation of `actor` and attaches it to `handle`.
pub async fn start_into<A: ractor::Actor>(
    handle: &ActorHandle<A::Msg>,
    actor: A,
    args: A::Arguments,
    supervisor: Option<ActorCell>,
) -> Result<ActorCell, ActorError> {
    let permits = handle.new_permits();
    let args = BoundedArgs {
        inner: args,
        permits: permits.clone(),
    };
    let spawned = match supervisor {
        Some(sup) => ractor::Actor::spawn_linked(None, Bounded(actor), args, sup).await,
        None => ractor::Actor::spawn(None, Bounded(actor), args).await,
    };
    let (actor_ref, _join) = spawned.map_err(|e| ActorError::Spawn {
        actor: handle.name().to_owned(),
        message: e.to_string(),
    })?;
    handle.attach(actor_ref.clone(), &permits);
    Ok(actor_ref.get_cell())
}
