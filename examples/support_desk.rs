//! The flagship: a customer support desk run by agents.
//!
//! Customers open durable sessions and ask questions, all at once. A
//! `triage` agent reads each question, asks a small routing model which
//! desk should answer (the model calls the typed `route_to` tool), and hands
//! the session by name to a seat of that desk: `refunds-N`, `billing-N` or
//! `technical-N`. A seat answers with `AgentContext::reply`: the support
//! model's reply streams into the session chunk by chunk, and the tools it
//! calls (`refund_status`, `lookup_invoice`, `run_diagnostics`) are
//! journaled call by call. Every model call holds a lease on a simulated
//! GPU (two of them; one with `--quick`). Refunds outrank billing, which
//! outranks technical questions, so in the rush some technical turns are
//! refused at once with a retry hint, and their customers ask again after
//! it.
//!
//! Midway, a billing seat is killed while it streams a reply: its
//! supervisor restarts it, and the interrupted turn is answered again as
//! attempt 2. A refunds customer loses its connection in the middle of a
//! reply and resumes from the last event it saw: it receives exactly the
//! events it missed. The run ends with a summary, and fails if any of this
//! did not happen.
//!
//! Run with `cargo run --release --example support_desk` (`make demo`).
//! `--quick` runs fewer customers with shorter replies; `--data-dir DIR`
//! chooses where the journals go (default: a fresh temporary directory).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::oneshot;
use troupe::agent::session::session_pid;
use troupe::agent::{
    ChatMessage, ChatRequest, Chunk, ChunkStream, ModelBackend, Overflow, SessionRecord,
    SessionStream,
};
use troupe::gpu::probe::SimulatedProbe;
use troupe::gpu::{GpuArgs, GpuConfig, GpuSupervisorHandle};
use troupe::prelude::*;

type Error = Box<dyn std::error::Error + Send + Sync>;

const GB: u64 = 1 << 30;
/// Seats per desk: agents `refunds-1` to `refunds-3`, and so on.
const SEATS: u64 = 3;
/// Longest wait for the next event of a turn before the run gives up.
const TURN_TIMEOUT: Duration = Duration::from_secs(30);
/// Retry delay after a failure that came without a hint.
const DEFAULT_RETRY: Duration = Duration::from_millis(200);

static START: LazyLock<Instant> = LazyLock::new(Instant::now);
/// Whether a refused customer is already followed in the account.
static REFUSAL_FOLLOWED: AtomicBool = AtomicBool::new(false);

/// One line of the account: time since the start, who, what.
fn log(who: &str, what: impl std::fmt::Display) {
    println!("  {:5.2}s  {who:<11} {what}", START.elapsed().as_secs_f64());
}

// ANCHOR: desks
/// The desks a question can be routed to.
#[derive(Clone, Copy, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum Desk {
    Refunds,
    Billing,
    Technical,
}

impl Desk {
    const ALL: [Desk; 3] = [Desk::Refunds, Desk::Billing, Desk::Technical];

    fn name(self) -> &'static str {
        match self {
            Desk::Refunds => "refunds",
            Desk::Billing => "billing",
            Desk::Technical => "technical",
        }
    }

    /// What a customer of this desk asks, question after question.
    fn questions(self) -> [&'static str; 3] {
        match self {
            Desk::Refunds => [
                "Where is the refund for order A-1042?",
                "How many days until the refund reaches my card?",
                "Great, I will watch for the refund. Thanks!",
            ],
            Desk::Billing => [
                "I was charged twice for invoice 1042.",
                "Can you send me the corrected invoice?",
                "Thanks. Will the second charge show on my next statement?",
            ],
            Desk::Technical => [
                "My router shows error 651 since this morning.",
                "I restarted the router and it still blinks red.",
                "The router works now, thank you!",
            ],
        }
    }

    /// What each model call of this desk asks of the GPUs: 45 % of a GPU's
    /// compute, so each GPU runs two replies at a time, next to triage's
    /// small lease. Refunds outrank billing, which queue for a GPU if they
    /// must. Technical questions come last and do not queue: when no GPU
    /// has room now, they are refused at once, with a hint of when to ask
    /// again.
    fn lease(self, hold: Duration) -> LeaseSpec {
        let (priority, wait) = match self {
            Desk::Refunds => (2, Duration::from_secs(5)),
            Desk::Billing => (1, Duration::from_secs(5)),
            Desk::Technical => (0, Duration::from_millis(10)),
        };
        LeaseSpec {
            memory: 24 * GB,
            compute: 30,
            priority,
            wait,
            expected: hold,
            ..LeaseSpec::default()
        }
    }

    /// The one tool this desk's model may call.
    fn tools(self) -> Tools {
        let tool = match self {
            Desk::Refunds => Tool::new(
                "refund_status",
                "Where the refund of an order is",
                |q: OrderQuery| async move {
                    Ok::<_, String>(json!({"order": q.order, "refund": "sent", "days": 3}))
                },
            ),
            Desk::Billing => Tool::new(
                "lookup_invoice",
                "An invoice and the payments made for it",
                |q: InvoiceQuery| async move {
                    Ok::<_, String>(json!({"invoice": q.invoice, "payments": 2, "due": 0}))
                },
            ),
            Desk::Technical => Tool::new(
                "run_diagnostics",
                "Runs the line diagnostics of a customer device",
                |q: DeviceQuery| async move {
                    Ok::<_, String>(json!({"device": q.device, "line": "resynced"}))
                },
            ),
        };
        Tools::new().with(tool)
    }
}

#[derive(Deserialize, JsonSchema)]
struct OrderQuery {
    /// Order number, like `A-1042`.
    order: String,
}

#[derive(Deserialize, JsonSchema)]
struct InvoiceQuery {
    /// Invoice number.
    invoice: u32,
}

#[derive(Deserialize, JsonSchema)]
struct DeviceQuery {
    /// Which device: `router`, `modem`...
    device: String,
}
// ANCHOR_END: desks

/// The seat of `desk` that answers `session`: always the same one, so
/// anyone can tell which seat a conversation is at.
fn seat_for(desk: Desk, session: &str) -> String {
    let mut h = DefaultHasher::new();
    session.hash(&mut h);
    format!("{}-{}", desk.name(), h.finish() % SEATS + 1)
}

// ANCHOR: triage
/// Typed arguments of `route_to`: the routing model must name a desk.
#[derive(Deserialize, JsonSchema)]
struct Route {
    desk: Desk,
}

/// Reads each new question, has the routing model pick a desk, and hands
/// the session to that desk's seat.
struct Triage;

#[troupe::async_trait]
impl Agent for Triage {
    /// A session with a new question.
    type Msg = String;

    async fn handle(&mut self, ctx: &AgentContext, session: String) -> Result<(), AgentError> {
        let view = ctx.sessions().view(&session).await?;
        let question = view.messages.last().map(|m| m.content.clone());
        let mut request = ChatRequest::new(
            &ctx.options().model,
            vec![ChatMessage::user(question.unwrap_or_default())],
        );
        request.tools = ctx.options().tools.specs();
        // One short model call, under a lease of its own.
        let mut desk = None;
        let mut stream = ctx.infer(request).await?;
        while let Some(chunk) = stream.next().await {
            if let Chunk::ToolCall(call) = chunk? {
                // The tool checks the model's arguments against `Route`.
                let picked = ctx.call_tool(&call.name, &call.arguments).await?;
                desk = serde_json::from_str(&picked).ok();
            }
        }
        // A question no desk claims goes to technical support.
        let seat = seat_for(desk.unwrap_or(Desk::Technical), &session);
        tokio::spawn(hand_over(ctx.clone(), seat, session));
        Ok(())
    }
}

/// Asks `seat`, by name, to answer `session`, and waits until the turn has
/// ended. If the seat dies first, its mailbox dies with it, and so does
/// the reply port: ask again, and the restarted seat answers.
async fn hand_over(ctx: AgentContext, seat: String, session: String) {
    for _ in 0..3 {
        let asked = ctx
            .ask(
                &seat,
                |done| Answer {
                    session: session.clone(),
                    done,
                },
                Duration::from_secs(60),
            )
            .await;
        match asked {
            Err(AgentError::Actor(ActorError::NoReply { .. })) => continue,
            Err(e) => log("triage", format!("could not hand over to {seat}: {e}")),
            Ok(()) => {}
        }
        return;
    }
    log(
        "triage",
        format!("{seat} died three times answering {session}"),
    );
}
// ANCHOR_END: triage

// ANCHOR: seat
/// Asks a seat to answer the pending turn of `session`. `done` answers once
/// the turn has ended: answered, or failed and journaled as such.
struct Answer {
    session: String,
    done: RpcReplyPort<()>,
}

/// One seat of a desk. Each incarnation is a fresh value; what it was
/// doing lives in the sessions.
struct Seat {
    incarnation: u32,
}

#[troupe::async_trait]
impl Agent for Seat {
    type Msg = Answer;

    async fn started(&mut self, ctx: &AgentContext) -> Result<(), AgentError> {
        if self.incarnation > 1 {
            let n = self.incarnation;
            log(
                ctx.name(),
                format!("restarted by its supervisor (incarnation {n})"),
            );
        }
        Ok(())
    }

    async fn handle(&mut self, ctx: &AgentContext, msg: Answer) -> Result<(), AgentError> {
        // Streams the reply into the session and runs the tools the model
        // calls. A refused lease is journaled as `turn_failed` with a retry
        // hint: the customer's business, not a failure of the seat.
        let outcome = match ctx.reply(&msg.session).await {
            Ok(_) => Outcome::Answered,
            Err(e) if e.retry_after().is_some() => Outcome::Refused,
            Err(_) => Outcome::Failed,
        };
        let ended = TurnEnded {
            seat: ctx.name().to_owned(),
            incarnation: self.incarnation,
            at: Instant::now(),
            outcome,
        };
        ctx.publish("turns", ended).await?;
        let _ = msg.done.send(());
        Ok(())
    }
}
// ANCHOR_END: seat

// ANCHOR: wallboard
/// Published by a seat on topic `turns` each time a turn ends.
#[derive(Clone)]
struct TurnEnded {
    seat: String,
    incarnation: u32,
    at: Instant,
    outcome: Outcome,
}

#[derive(Clone, Copy, PartialEq)]
enum Outcome {
    Answered,
    /// The GPU lease was refused, with a retry hint.
    Refused,
    Failed,
}

/// Every turn that ended, as the wallboard saw it. It outlives the
/// wallboard agent, so a restart would not wipe it.
type Board = Arc<Mutex<Vec<TurnEnded>>>;

/// The desk's wallboard: subscribed to topic `turns`.
struct Wallboard(Board);

#[troupe::async_trait]
impl Agent for Wallboard {
    type Msg = TurnEnded;

    async fn handle(&mut self, _: &AgentContext, ended: TurnEnded) -> Result<(), AgentError> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(ended);
        Ok(())
    }
}
// ANCHOR_END: wallboard

/// One line of the wallboard: each GPU's leased compute (one `#` per 10 %),
/// then the turns answered and refused so far.
async fn report(gpu: &GpuSupervisorHandle, board: &Board) -> Result<(), Error> {
    let mut line = String::new();
    for status in gpu.status().await? {
        let tenths = (status.leased.1 as usize / 10).min(10);
        let bar = "#".repeat(tenths) + &".".repeat(10 - tenths);
        line += &format!("GPU{} {bar}  ", status.device.index);
    }
    let (mut answered, mut refused) = (0, 0);
    for ended in board.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        match ended.outcome {
            Outcome::Answered => answered += 1,
            Outcome::Refused => refused += 1,
            Outcome::Failed => {}
        }
    }
    log(
        "wallboard",
        format!("{line}answered {answered:>3}   refused early {refused:>3}"),
    );
    Ok(())
}

/// The model server: a backend that counts the calls it serves. Inference
/// takes a GPU lease before each call, so every call counted held a lease.
struct Metered {
    model: LocalBackend,
    calls: Arc<AtomicU64>,
}

#[troupe::async_trait]
impl ModelBackend for Metered {
    fn name(&self) -> &str {
        self.model.name()
    }

    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream, AgentError> {
        self.calls.fetch_add(1, Relaxed);
        self.model.stream(request).await
    }
}

/// What happens to one customer on purpose.
enum Mishap {
    /// At the first chunk of the reply to this question (counted from 0),
    /// the seat answering it is killed.
    SeatKilled {
        question: usize,
        kill: oneshot::Sender<String>,
    },
    /// After this many chunks of the reply to this question, the
    /// connection drops for `away`.
    ConnectionLost {
        question: usize,
        after_chunks: u32,
        away: Duration,
    },
}

/// How a turn ended, as the customer saw it.
enum TurnEnd {
    Answered,
    Failed {
        error: String,
        retry_after: Option<Duration>,
    },
}

/// A customer's end of a session: a subscription whose every event must
/// be the one after the last it saw.
struct Client {
    name: String,
    desk: Desk,
    sessions: Sessions,
    id: String,
    stream: SessionStream,
    /// Every event received, in order.
    received: Vec<Arc<SessionRecord>>,
    /// Whether its replies are printed.
    spotlight: bool,
    mishap: Option<Mishap>,
    /// While resuming: the last event seen, and the last journaled, when
    /// it reconnected.
    catching_up: Option<(u64, u64)>,
    /// Events it missed while away and received once resumed.
    resumed: Option<u64>,
}

impl Client {
    // ANCHOR: open
    async fn open(
        sessions: &Sessions,
        name: String,
        desk: Desk,
        mishap: Option<Mishap>,
    ) -> Result<Self, Error> {
        let id = sessions.create("triage", None).await?;
        let stream = sessions.subscribe(&id, 0).await?;
        Ok(Self {
            name,
            desk,
            sessions: sessions.clone(),
            id,
            stream,
            received: Vec::new(),
            spotlight: mishap.is_some(),
            mishap,
            catching_up: None,
            resumed: None,
        })
    }
    // ANCHOR_END: open

    fn last_seq(&self) -> u64 {
        self.received.last().map_or(0, |r| r.seq)
    }

    // ANCHOR: next
    /// The next event; an error if it is not the one after the last seen.
    async fn next(&mut self) -> Result<Arc<SessionRecord>, Error> {
        loop {
            let item = tokio::time::timeout(TURN_TIMEOUT, self.stream.next())
                .await
                .map_err(|_| format!("{}: no event for {TURN_TIMEOUT:?}", self.name))?
                .ok_or("the subscription ended")??;
            let SessionItem::Event(rec) = item else {
                continue; // a heartbeat
            };
            let last = self.last_seq();
            if rec.seq != last + 1 {
                return Err(format!("{}: seq {} after {last}", self.name, rec.seq).into());
            }
            self.received.push(rec.clone());
            if let Some((from, to)) = self.catching_up.filter(|&(_, to)| to == rec.seq) {
                let missed = to - from;
                log(
                    &self.name,
                    format!(
                        "got the {missed} events it missed (seq {}..={to}) once each, \
                         from the journal; now live again",
                        from + 1
                    ),
                );
                self.catching_up = None;
                self.resumed = Some(missed);
            }
            return Ok(rec);
        }
    }
    // ANCHOR_END: next

    // ANCHOR: reconnect
    /// Drops the connection, stays away, and resumes after the last event seen.
    async fn reconnect(&mut self, away: Duration) -> Result<(), Error> {
        let last = self.last_seq();
        self.stream = futures::stream::empty().boxed();
        log(&self.name, format!("connection lost after seq {last}"));
        tokio::time::sleep(away).await;
        let journaled = self.sessions.view(&self.id).await?.seq;
        self.stream = self.sessions.subscribe(&self.id, last).await?;
        log(
            &self.name,
            format!("reconnects: subscribe(after seq {last}); {journaled} events journaled"),
        );
        self.catching_up = Some((last, journaled));
        Ok(())
    }
    // ANCHOR_END: reconnect

    // ANCHOR: follow
    /// Follows turn `turn` (the reply to question `question`) to its end.
    async fn follow(&mut self, question: usize, turn: u32) -> Result<TurnEnd, Error> {
        let mut reply = String::new();
        let mut chunks = 0;
        loop {
            let rec = self.next().await?;
            match &rec.event {
                SessionEvent::TurnStarted {
                    turn: t, attempt, ..
                } if *t == turn => {
                    if *attempt > 1 {
                        let dropped = short(&reply, 30);
                        log(
                            &self.name,
                            format!(
                                "turn {turn}: attempt {attempt} starts over; \
                                 drops the partial reply \"{dropped}\""
                            ),
                        );
                    }
                    reply.clear();
                    chunks = 0;
                }
                SessionEvent::ModelChunk { turn: t, text } if *t == turn => {
                    reply.push_str(text);
                    chunks += 1;
                    self.mishap_at(question, chunks).await?;
                }
                SessionEvent::TurnCompleted { turn: t, .. } if *t == turn => {
                    if self.spotlight {
                        let (q, reply) = (question + 1, short(&reply, 50));
                        log(
                            &self.name,
                            format!("question {q} answered (turn {turn}): \"{reply}\""),
                        );
                    }
                    return Ok(TurnEnd::Answered);
                }
                SessionEvent::TurnFailed {
                    turn: t,
                    error,
                    retry_after_ms,
                } if *t == turn => {
                    return Ok(TurnEnd::Failed {
                        error: error.clone(),
                        retry_after: retry_after_ms.map(Duration::from_millis),
                    });
                }
                _ => {}
            }
        }
    }
    // ANCHOR_END: follow

    /// Lets this customer's mishap happen, if it is due.
    async fn mishap_at(&mut self, question: usize, chunks: u32) -> Result<(), Error> {
        match self.mishap.take() {
            Some(Mishap::SeatKilled { question: q, kill }) if q == question && chunks == 1 => {
                let _ = kill.send(self.id.clone());
            }
            Some(Mishap::ConnectionLost {
                question: q,
                after_chunks,
                away,
            }) if q == question && chunks == after_chunks => self.reconnect(away).await?,
            other => self.mishap = other,
        }
        Ok(())
    }
}

// ANCHOR: converse
/// A customer: asks each question, follows the reply, asks again after a
/// refusal, then closes the session.
async fn converse(
    mut client: Client,
    triage: ActorHandle<String>,
    questions: Vec<&'static str>,
    think: Duration,
) -> Result<Client, Error> {
    for (q, question) in questions.into_iter().enumerate() {
        loop {
            let posted = client.sessions.post(&client.id, question).await?;
            // By name, like any client: the front door tells triage.
            triage
                .send(client.id.clone(), TURN_TIMEOUT)
                .await
                .map_err(|r| r.error)?;
            match client.follow(q, posted.turn).await? {
                TurnEnd::Answered => break,
                TurnEnd::Failed { error, retry_after } => {
                    // The account follows the first customer refused.
                    let first = retry_after.is_some() && !REFUSAL_FOLLOWED.swap(true, SeqCst);
                    client.spotlight |= first;
                    let wait = retry_after.unwrap_or(DEFAULT_RETRY);
                    let what = match retry_after {
                        Some(_) if !first => "refused early".to_owned(),
                        Some(_) => format!("refused early ({error})"),
                        None => format!("failed ({error})"),
                    };
                    if client.spotlight || retry_after.is_none() {
                        let (desk, q, ms) = (client.desk.name(), q + 1, wait.as_millis());
                        let line = format!("{desk} question {q} {what}; asks again in {ms} ms");
                        log(&client.name, line);
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
        tokio::time::sleep(think).await;
    }
    client.sessions.close(&client.id, "resolved").await?;
    client.next().await?; // the `closed` event
    Ok(client)
}
// ANCHOR_END: converse

// ANCHOR: kill
/// Waits for a customer to ask for its seat to be killed, and kills it.
async fn kill_seat(
    system: AgentSystem,
    desk: Desk,
    asked: oneshot::Receiver<String>,
) -> Result<(String, Instant), Error> {
    let session = asked.await?;
    let seat = seat_for(desk, &session);
    let handle = system.handle::<Answer>(&seat)?;
    handle.cell().ok_or("the seat is not running")?.kill();
    log(&seat, "killed while it streams a reply");
    Ok((seat, Instant::now()))
}
// ANCHOR_END: kill

/// The sizes of a run.
#[derive(Clone, Copy)]
struct Scale {
    gpus: u32,
    customers: usize,
    questions: usize,
    /// Reply length, in words (two per chunk).
    words: usize,
    first_chunk: Duration,
    between_chunks: Duration,
    /// A customer's pause between questions (times 1, 2 or 3).
    think: Duration,
    /// How long the dropped connection stays down.
    away: Duration,
    /// How often the wallboard line is printed.
    every: Duration,
}

impl Scale {
    fn new(quick: bool) -> Self {
        if quick {
            Scale {
                gpus: 1,
                customers: 12,
                questions: 2,
                words: 24,
                first_chunk: Duration::from_millis(4),
                between_chunks: Duration::from_millis(4),
                think: Duration::from_millis(20),
                away: Duration::from_millis(10),
                every: Duration::from_millis(100),
            }
        } else {
            Scale {
                gpus: 2,
                customers: 24,
                questions: 3,
                words: 24,
                first_chunk: Duration::from_millis(20),
                between_chunks: Duration::from_millis(8),
                think: Duration::from_millis(150),
                away: Duration::from_millis(40),
                every: Duration::from_millis(250),
            }
        }
    }

    /// How long a reply holds its lease: the model's time, plus the journal
    /// writes between chunks, rounded up. The GPU supervisor's wait
    /// estimates, and so its refusals, build on it.
    fn hold(&self) -> Duration {
        (self.first_chunk + self.between_chunks * (self.words as u32 / 2)) * 2
    }
}

/// What the journal holds, over every customer's session.
#[derive(Default)]
struct Tally {
    answered: usize,
    tool_calls: usize,
    /// Retry hints of the turns refused early, in ms.
    hints: Vec<u64>,
    /// Turns that failed without a hint.
    failed: usize,
    events: usize,
    /// The turns answered again after a crash: customer, turn.
    again: Vec<(String, u32)>,
    /// Customers whose events differ from their session's journal.
    mismatched: Vec<String>,
}

impl Tally {
    async fn read(journal: &Arc<dyn Journal>, clients: &[Client]) -> Result<Self, Error> {
        let mut tally = Tally::default();
        for c in clients {
            let pid = session_pid(&c.id)?;
            let journaled = journal.replay(&pid, 1, u64::MAX).collect_all().await?;
            tally.events += journaled.len();
            let mut same = journaled.len() == c.received.len();
            for (persisted, received) in journaled.iter().zip(&c.received) {
                let event: SessionEvent = persisted.decode()?;
                same &= persisted.seq == received.seq && event == received.event;
                match event {
                    SessionEvent::TurnCompleted { .. } => tally.answered += 1,
                    SessionEvent::ToolCalled { .. } => tally.tool_calls += 1,
                    SessionEvent::TurnFailed {
                        retry_after_ms: Some(ms),
                        ..
                    } => tally.hints.push(ms),
                    SessionEvent::TurnFailed { .. } => tally.failed += 1,
                    SessionEvent::TurnStarted { turn, attempt, .. } if attempt > 1 => {
                        tally.again.push((c.name.clone(), turn));
                    }
                    _ => {}
                }
            }
            if !same {
                tally.mismatched.push(c.name.clone());
            }
        }
        Ok(tally)
    }
}

/// Prints the events of turn `turn` of `client`'s session, each run of
/// chunks on one line.
fn print_turn(client: &Client, turn: u32) {
    let first = client
        .received
        .iter()
        .position(|r| matches!(r.event, SessionEvent::UserTurn { turn: t, .. } if t == turn));
    let events = &client.received[first.unwrap_or(client.received.len())..];
    let mut i = 0;
    while i < events.len() {
        let (seq, event) = (events[i].seq, &events[i].event);
        let line = match event {
            SessionEvent::UserTurn { text, .. } => format!("user_turn       \"{text}\""),
            SessionEvent::TurnStarted { attempt, .. } => {
                format!("turn_started    attempt {attempt}")
            }
            SessionEvent::ToolCalled { call, .. } => {
                format!("tool_called     {} {}", call.name, call.arguments)
            }
            SessionEvent::ToolResult { output, .. } => format!("tool_result     {output}"),
            SessionEvent::TurnCompleted { finish_reason, .. } => {
                format!("turn_completed  {finish_reason}")
            }
            SessionEvent::ModelChunk { .. } => {
                let mut text = String::new();
                let mut last = seq;
                while let Some(SessionEvent::ModelChunk { text: t, .. }) =
                    events.get(i).map(|r| &r.event)
                {
                    text.push_str(t);
                    last = events[i].seq;
                    i += 1;
                }
                let run = last - seq + 1;
                let seqs = if run == 1 {
                    seq.to_string()
                } else {
                    format!("{seq}-{last}")
                };
                println!(
                    "    {seqs:>7}  model_chunk ×{run:<2} \"{}\"",
                    short(&text, 40)
                );
                continue;
            }
            other => format!("{other:?}"),
        };
        println!("    {seq:>7}  {line}");
        if matches!(event, SessionEvent::TurnCompleted { .. }) {
            break;
        }
        i += 1;
    }
}

/// The first `n` characters of `text`, and "..." if there was more.
fn short(text: &str, n: usize) -> String {
    match text.char_indices().nth(n) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    LazyLock::force(&START);
    let args: Vec<String> = std::env::args().collect();
    let scale = Scale::new(args.iter().any(|a| a == "--quick"));
    let temp = tempfile::tempdir()?;
    let data_dir = match args.iter().position(|a| a == "--data-dir") {
        Some(i) => PathBuf::from(args.get(i + 1).ok_or("--data-dir needs a directory")?),
        None => temp.path().to_owned(),
    };
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)?;
    }

    // ANCHOR: journals
    // Sessions are journaled with fsync: a client only ever sees journaled
    // events, so nothing it saw can be taken back by a power cut. The GPU
    // supervisor's lease journal is buffered: a lease is worth nothing once
    // the process holding it is gone, and a grant costs no disk sync.
    let troupe = Troupe::builder()
        .data_dir(&data_dir)
        .durability(Durability::Fsync)
        .build()
        .await?;
    let sessions = Sessions::new(troupe.journal(), SessionConfig::default());
    let leases = RocksJournal::open(
        RocksConfig::new(data_dir.join("leases")).durability(Durability::Buffered),
    )?;
    let gpu = GpuSupervisorHandle::spawn(
        GpuArgs {
            probe: Arc::new(SimulatedProbe::new(scale.gpus, 80 * GB)),
            journal: Arc::new(leases.clone()),
            config: GpuConfig::default(),
        },
        None,
    )
    .await?;
    // ANCHOR_END: journals

    // ANCHOR: models
    // A small routing model for triage, and the support model the seats
    // share: deterministic local models that call tools on keywords.
    let router = LocalBackend::named("router")
        .latency(Duration::from_millis(2), Duration::from_millis(1))
        .call_tool_when("refund", "route_to", json!({"desk": "refunds"}))
        .call_tool_when("invoice", "route_to", json!({"desk": "billing"}))
        .call_tool_when("charge", "route_to", json!({"desk": "billing"}))
        .call_tool_when("router", "route_to", json!({"desk": "technical"}));
    let support = LocalBackend::named("support")
        .words(scale.words, 2)
        .latency(scale.first_chunk, scale.between_chunks)
        .call_tool_when("refund", "refund_status", json!({"order": "A-1042"}))
        .call_tool_when("invoice", "lookup_invoice", json!({"invoice": 1042}))
        .call_tool_when("error", "run_diagnostics", json!({"device": "router"}));
    let calls = Arc::new(AtomicU64::new(0));
    let inference = Inference::new()
        .with_backend(Metered {
            model: router,
            calls: calls.clone(),
        })
        .with_backend(Metered {
            model: support,
            calls: calls.clone(),
        })
        .with_gpu(gpu.clone()); // every model call holds a lease
    // ANCHOR_END: models

    // ANCHOR: agents
    let system = AgentSystem::new(sessions.clone(), inference);
    let route_to = Tool::new(
        "route_to",
        "Hands the conversation to a desk",
        |r: Route| async move { Ok::<_, String>(r.desk) },
    );
    let triage_lease = LeaseSpec {
        memory: 8 * GB,
        compute: 10,
        priority: 3,
        expected: Duration::from_millis(5),
        ..LeaseSpec::default()
    };
    let triage_options = AgentOptions::default()
        .model("router", "router")
        .tools(Tools::new().with(route_to))
        .lease(triage_lease.clone());
    let (triage, _) = system.agent("triage", triage_options, || Triage)?;
    let board = Board::default();
    let b = board.clone();
    let (wallboard, wallboard_handle) =
        system.agent("wallboard", AgentOptions::default(), move || {
            Wallboard(b.clone())
        })?;
    // Seats wait for room in the wallboard's mailbox rather than drop a turn.
    system
        .topics()
        .declare::<TurnEnded>("turns", Overflow::Wait(Duration::from_secs(1)))?;
    system.topics().subscribe("turns", wallboard_handle)?;
    let mut desk = SupervisorSpec::new("desk").child(triage).child(wallboard);
    for d in Desk::ALL {
        for n in 1..=SEATS {
            let options = AgentOptions::default()
                .model("support", "support")
                .system_prompt(format!("You answer {} questions for Acme.", d.name()))
                .tools(d.tools())
                .lease(d.lease(scale.hold()));
            let incarnations = Arc::new(AtomicU32::new(0));
            let (seat, _) = system.agent(&format!("{}-{n}", d.name()), options, move || Seat {
                incarnation: incarnations.fetch_add(1, SeqCst) + 1,
            })?;
            desk = desk.child(seat);
        }
    }
    let desk = SupervisorHandle::spawn(desk).await?;
    // ANCHOR_END: agents

    let gpus = match scale.gpus {
        1 => "1 simulated 80 GB GPU".to_owned(),
        n => format!("{n} simulated 80 GB GPUs"),
    };
    println!(
        "support desk: {} customers, {} questions each, all at once, on {gpus}",
        scale.customers, scale.questions
    );
    println!("journals in {}", data_dir.display());
    println!("  agents          model    lease        priority  waits at most  tool");
    let mut rows = vec![(
        "triage".to_owned(),
        "router",
        triage_lease,
        "route_to".into(),
    )];
    for d in Desk::ALL {
        let seats = format!("{}-1..{SEATS}", d.name());
        let tools: Vec<String> = d.tools().specs().into_iter().map(|t| t.name).collect();
        rows.push((seats, "support", d.lease(scale.hold()), tools.join(", ")));
    }
    for (agents, model, lease, tool) in rows {
        let size = format!("{} GB, {}%", lease.memory / GB, lease.compute);
        let wait = format!("{:?}", lease.wait);
        println!(
            "  {agents:<15} {model:<8} {size:<12} {:<9} {wait:<14} {tool}",
            lease.priority
        );
    }
    println!();

    let reporter = {
        let (gpu, board) = (gpu.clone(), board.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(scale.every);
            loop {
                every.tick().await;
                if report(&gpu, &board).await.is_err() {
                    break;
                }
            }
        })
    };
    // ANCHOR: customers
    let (kill, kill_asked) = oneshot::channel();
    let chaos = tokio::spawn(kill_seat(system.clone(), Desk::Billing, kill_asked));
    let triage = system.handle::<String>("triage")?;
    let mut kill = Some(kill);
    let mut customers = Vec::new();
    for i in 0..scale.customers {
        let desk = Desk::ALL[i % Desk::ALL.len()];
        // The first refunds customer loses its connection during its first
        // reply; the first billing customer's seat dies during its second.
        let mishap = match desk {
            Desk::Refunds if i == 0 => Some(Mishap::ConnectionLost {
                question: 0,
                after_chunks: 3,
                away: scale.away,
            }),
            Desk::Billing => kill
                .take()
                .map(|kill| Mishap::SeatKilled { question: 1, kill }),
            _ => None,
        };
        let client = Client::open(&sessions, format!("cust-{:02}", i + 1), desk, mishap).await?;
        let questions = desk.questions()[..scale.questions].to_vec();
        let think = scale.think * (1 + i as u32 % 3);
        let triage = triage.clone();
        customers.push(tokio::spawn(converse(client, triage, questions, think)));
    }
    let mut clients = Vec::new();
    for c in customers {
        clients.push(c.await??);
    }
    // ANCHOR_END: customers
    let (killed, killed_at) = chaos.await??;
    let elapsed = START.elapsed();
    reporter.abort();
    report(&gpu, &board).await?;

    let tally = Tally::read(&troupe.journal(), &clients).await?;
    let restarts: u32 = desk
        .children(Duration::from_secs(5))
        .await?
        .iter()
        .map(|c| c.restarts)
        .sum();
    let recovered = board
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|e| e.seat == killed && e.incarnation > 1 && e.outcome == Outcome::Answered)
        .map(|e| e.at.duration_since(killed_at))
        .min();
    let resumed = clients.iter().find_map(|c| c.resumed);
    let held: u64 = gpu.status().await?.iter().map(|s| s.leased.0).sum();
    let questions = scale.customers * scale.questions;
    let hints = &tally.hints;
    let mean_hint = hints.iter().sum::<u64>() / hints.len().max(1) as u64;

    let row = |what: &str, n: u128, note: &str| {
        let line = format!("  {what:<26} {n:>6}  {note}");
        println!("{}", line.trim_end());
    };
    println!("\nsummary");
    row("customers", clients.len() as u128, "");
    let tools = format!("of {questions}, with {} tool calls", tally.tool_calls);
    row("questions answered", tally.answered as u128, &tools);
    let granted = calls.load(Relaxed) as u128;
    row("GPU leases granted", granted, "one per model call");
    let note = format!("turns asked again after the hint (mean {mean_hint} ms)");
    row("GPU leases refused early", hints.len() as u128, &note);
    if tally.failed > 0 {
        let note = format!("asked again after {} ms", DEFAULT_RETRY.as_millis());
        row("turns failed otherwise", tally.failed as u128, &note);
    }
    let note = format!("{killed}, by its supervisor");
    row("agent restarts", restarts.into(), &note);
    let again = tally.again.len() as u128;
    row(
        "turns answered again",
        again,
        "a new attempt, after the crash",
    );
    let ms = recovered.map_or(0, |r| r.as_millis());
    let note = "ms from the kill to the restarted seat's first answer";
    row("time to recover", ms, note);
    let missed = resumed.unwrap_or(0).into();
    row(
        "missed events on resuming",
        missed,
        "each received once, none twice",
    );
    let note = "each received once, in order, by its customer";
    row("events journaled", tally.events as u128, note);
    row("GPU memory still leased", held.into(), "bytes");
    row("run time", elapsed.as_millis(), "ms");
    if let Some((name, turn)) = tally.again.first() {
        println!("\n{name}'s turn {turn}, as journaled:");
        if let Some(c) = clients.iter().find(|c| &c.name == name) {
            print_turn(c, *turn);
        }
    }

    desk.stop(Duration::from_secs(5)).await;
    sessions.passivate_all().await;
    gpu.stop().await;
    leases.close().await;
    troupe.shutdown().await?;

    let missing: Vec<&str> = [
        ("every question answered", tally.answered == questions),
        ("an early refusal with a retry hint", !hints.is_empty()),
        ("one restart, of the killed seat", restarts == 1),
        (
            "the interrupted turn answered again",
            !tally.again.is_empty(),
        ),
        ("an answer by the restarted seat", recovered.is_some()),
        ("missed events received on resuming", resumed > Some(0)),
        (
            "transcripts equal to the journal",
            tally.mismatched.is_empty(),
        ),
        ("every lease released", held == 0),
    ]
    .into_iter()
    .filter(|(_, seen)| !seen)
    .map(|(what, _)| what)
    .collect();
    if !missing.is_empty() {
        eprintln!("support_desk: this run lacked {}", missing.join(", "));
        std::process::exit(1);
    }
    println!("\ndone: routed, streamed, refused and retried, crashed and recovered, resumed");
    Ok(())
}
