//! The flagship: a customer support desk run by agents.
//!
//! Customers open durable sessions and ask questions, all at once. Each
//! session is answered by instances of its own: `triage` reads the
//! question, asks a small routing model which desk should answer (the
//! model calls the typed `route_to` tool), and hands the turn to that
//! desk: `refunds`, `billing` or `technical`. A desk answers with the
//! support model: the reply streams into the session chunk by chunk, and
//! the tools it calls (`refund_status`, `lookup_invoice`,
//! `run_diagnostics`) are journaled call by call. Every model call holds a
//! lease on a simulated GPU (two of them; one with `--quick`). Refunds
//! outrank billing, which outranks technical questions, so in the rush
//! some technical turns are refused at once with a retry hint (they queue
//! only briefly), and their customers ask again after it. Each desk tells the `wallboard` agent how
//! each turn ended; the wallboard's tallies are its journaled state.
//!
//! Midway, the billing instance of one customer is killed while it streams
//! a reply: its turn is answered again as attempt 2, which reuses the
//! journaled result of the tool call attempt 1 made instead of calling the
//! tool again. A refunds customer loses its connection in the middle of a
//! reply and resumes from the last event it saw: it receives exactly the
//! events it missed. The run ends with a summary, and fails if any of this
//! did not happen.
//!
//! Run with `make demo` (`cargo run --release --example support_desk`).
//! `--quick` runs fewer customers; `--data-dir DIR` chooses where the
//! journals go (default: a fresh temporary directory). With
//! `MODEL_URL=http://127.0.0.1:11434/v1 MODEL=llama3.2` (Ollama, vLLM,
//! llama.cpp's server: any OpenAI-compatible server) the same desk runs on
//! that model instead of the deterministic local one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use futures::StreamExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use troupe::agent::{ChatMessage, ChatRequest, Chunk, ModelBackend, SessionRecord, SessionStream};
use troupe::gpu::probe::SimulatedProbe;
use troupe::prelude::*;

const GB: u64 = 1 << 30;
/// Longest wait for the next event of a turn before the run gives up.
const TURN_TIMEOUT: Duration = Duration::from_secs(60);

static START: LazyLock<Instant> = LazyLock::new(Instant::now);
/// Refusals of one question after which its customer gives up.
const MAX_REFUSALS: u32 = 40;

/// Whether a refused customer is already followed in the account.
static REFUSAL_FOLLOWED: AtomicBool = AtomicBool::new(false);

/// One line of the account: time since the start, who, what.
fn log(who: &str, what: impl std::fmt::Display) {
    println!("  {:5.2}s  {who:<11} {what}", START.elapsed().as_secs_f64());
}

// ANCHOR: desks
/// Answers one desk's questions with the support model and the desk's
/// tool. What it remembers of each customer is journaled with it.
struct Desk;

const REFUNDS: AgentKey<Desk> = AgentKey::new("refunds");
const BILLING: AgentKey<Desk> = AgentKey::new("billing");
const TECHNICAL: AgentKey<Desk> = AgentKey::new("technical");
const DESKS: [AgentKey<Desk>; 3] = [REFUNDS, BILLING, TECHNICAL];

/// What a desk remembers of one customer.
#[derive(Default, Serialize, Deserialize)]
struct Customer {
    answered: u32,
}

impl Agent for Desk {
    type State = Customer;

    async fn on_turn(
        &self,
        customer: &mut Customer,
        ctx: &mut Context<Self>,
    ) -> Result<(), AgentError> {
        // The reply streams into the session; tool calls are journaled
        // before they run, and their results as soon as they return. A
        // refused lease ends the turn as failed, with a retry hint.
        let outcome = match ctx.reply().await {
            Ok(_) => {
                customer.answered += 1;
                Outcome::Answered
            }
            Err(e) if e.retry_after().is_some() => Outcome::Refused,
            Err(_) => Outcome::Failed,
        };
        let ended = TurnEnded {
            desk: ctx.agent_name().to_owned(),
            outcome,
        };
        ctx.agent(&WALLBOARD)?.get("main").tell(ended).await
    }
}

/// How many questions this desk has answered for this customer.
struct Answered;

impl Handles<Answered> for Desk {
    type Reply = u32;
    async fn handle(&self, customer: &mut Customer, _: Answered, _: &mut Context<Self>) -> u32 {
        customer.answered
    }
}

/// The options of each desk: its tool, and its place in the GPU queue.
/// Refunds outrank billing, which queue for a GPU if they must; technical
/// questions come last and queue only briefly (half a reply's time): when
/// the work ahead of them is longer, they are refused at once, with a hint
/// of when to ask again. The GPU supervisor admits against the run times it
/// learns, not against `hold` itself: a budget of `hold` alone, with no
/// room for a reply that runs a little longer than guessed, would have
/// every technical question refused once it has learned that.
fn desk_options(desk: &AgentKey<Desk>, hold: Duration) -> AgentOptions {
    let (priority, wait, tool) = match desk.name() {
        "refunds" => (2, Duration::from_secs(5), refund_status()),
        "billing" => (1, Duration::from_secs(5), lookup_invoice()),
        _ => (0, hold / 2, run_diagnostics()),
    };
    let lease = LeaseSpec {
        memory: 24 * GB,
        compute: 30,
        priority,
        wait,
        expected: hold,
        ..LeaseSpec::default()
    };
    AgentOptions::default()
        .model("support", model_name())
        .system_prompt(format!(
            "You answer {} questions for Acme. Be brief.",
            desk.name()
        ))
        .tools(Tools::new().with(tool))
        .lease(lease)
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

fn refund_status() -> Tool {
    Tool::new(
        "refund_status",
        "Where the refund of an order is",
        |q: OrderQuery| async move {
            Ok::<_, String>(json!({"order": q.order, "refund": "sent", "days": 3}))
        },
    )
}

fn lookup_invoice() -> Tool {
    Tool::new(
        "lookup_invoice",
        "An invoice and its payments",
        |q: InvoiceQuery| async move {
            Ok::<_, String>(json!({"invoice": q.invoice, "payments": 2, "due": 0}))
        },
    )
}

fn run_diagnostics() -> Tool {
    Tool::new(
        "run_diagnostics",
        "Checks a customer's line",
        |q: DeviceQuery| async move { Ok::<_, String>(json!({"device": q.device, "line": "resynced"})) },
    )
}
// ANCHOR_END: desks

// ANCHOR: triage
/// Typed arguments of `route_to`: the routing model must name a desk.
#[derive(Deserialize, JsonSchema)]
struct Route {
    desk: DeskName,
}

#[derive(Clone, Copy, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum DeskName {
    Refunds,
    Billing,
    Technical,
}

/// Reads each question, has the routing model pick a desk, and hands the
/// turn to it.
struct Triage;

const TRIAGE: AgentKey<Triage> = AgentKey::new("triage");

impl Agent for Triage {
    type State = ();

    async fn on_turn(&self, _: &mut (), ctx: &mut Context<Self>) -> Result<(), AgentError> {
        let question = ctx.view().await?.messages.last().map(|m| m.content.clone());
        let mut request = ChatRequest::new(
            &ctx.options().model,
            vec![ChatMessage::user(question.unwrap_or_default())],
        );
        request.tools = ctx.options().tools.specs();
        // One short model call, under a lease of its own.
        let mut desk = DeskName::Technical; // what no desk claims
        let mut stream = ctx.infer(request).await?;
        while let Some(chunk) = stream.next().await {
            if let Chunk::ToolCall(call) = chunk? {
                // The tool checks the model's arguments against `Route`.
                let picked = ctx.call_tool(&call.name, &call.arguments).await?;
                desk = serde_json::from_str(&picked).unwrap_or(desk);
            }
        }
        // Journaled, then the desk's instance for this session answers.
        match desk {
            DeskName::Refunds => ctx.hand_off(&REFUNDS).await,
            DeskName::Billing => ctx.hand_off(&BILLING).await,
            DeskName::Technical => ctx.hand_off(&TECHNICAL).await,
        }
    }
}

fn triage_options() -> AgentOptions {
    let route_to = Tool::new(
        "route_to",
        "Hands the conversation to a desk",
        |r: Route| async move { Ok::<_, String>(r.desk) },
    );
    AgentOptions::default()
        .model("router", model_name())
        .tools(Tools::new().with(route_to))
        .lease(LeaseSpec {
            memory: 8 * GB,
            compute: 10,
            priority: 3,
            expected: Duration::from_millis(5),
            ..LeaseSpec::default()
        })
}
// ANCHOR_END: triage

// ANCHOR: wallboard
/// A desk's report of how a turn ended.
struct TurnEnded {
    desk: String,
    outcome: Outcome,
}

#[derive(Clone, Copy, PartialEq, Serialize, Deserialize)]
enum Outcome {
    Answered,
    /// The GPU lease was refused, with a retry hint.
    Refused,
    Failed,
}

/// The desk's wallboard: one instance (`main`) whose tallies, by desk, are
/// its journaled state.
struct Wallboard;

const WALLBOARD: AgentKey<Wallboard> = AgentKey::new("wallboard");

#[derive(Clone, Default, Serialize, Deserialize)]
struct Tallies {
    answered: BTreeMap<String, u32>,
    refused: BTreeMap<String, u32>,
}

impl Agent for Wallboard {
    type State = Tallies;
}

impl Handles<TurnEnded> for Wallboard {
    type Reply = ();
    async fn handle(&self, t: &mut Tallies, ended: TurnEnded, _: &mut Context<Self>) {
        let tally = match ended.outcome {
            Outcome::Answered => &mut t.answered,
            Outcome::Refused => &mut t.refused,
            Outcome::Failed => return,
        };
        *tally.entry(ended.desk).or_default() += 1;
    }
}

/// The tallies so far.
struct Read;

impl Handles<Read> for Wallboard {
    type Reply = Tallies;
    async fn handle(&self, t: &mut Tallies, _: Read, _: &mut Context<Self>) -> Tallies {
        t.clone()
    }
}
// ANCHOR_END: wallboard

/// One line of the wallboard: each GPU's leased compute (one `#` per 10 %),
/// then the turns answered and refused so far.
async fn report(troupe: &Troupe) -> troupe::Result<()> {
    let mut line = String::new();
    for status in troupe.gpu().ok_or("no GPUs")?.status().await? {
        let tenths = (status.leased.1 as usize / 10).min(10);
        let bar = "#".repeat(tenths) + &".".repeat(10 - tenths);
        line += &format!("GPU{} {bar}  ", status.device.index);
    }
    let t = troupe.agent(&WALLBOARD)?.get("main").ask(Read).await?;
    let (answered, refused): (u32, u32) = (t.answered.values().sum(), t.refused.values().sum());
    log(
        "wallboard",
        format!("{line}answered {answered:>3}   refused early {refused:>3}"),
    );
    Ok(())
}

/// The models: deterministic local ones that call tools on keywords, or
/// any OpenAI-compatible server given by `MODEL_URL`.
fn models(scale: &Scale) -> troupe::Result<(Arc<dyn ModelBackend>, Arc<dyn ModelBackend>)> {
    if let Some(url) = model_url() {
        let server: Arc<dyn ModelBackend> = Arc::new(OpenAiBackend::new(OpenAiConfig::new(url))?);
        return Ok((server.clone(), server));
    }
    let router = LocalBackend::named("router")
        .latency(Duration::from_millis(2), Duration::from_millis(1))
        .call_tool_when("refund", "route_to", json!({"desk": "refunds"}))
        .call_tool_when("invoice", "route_to", json!({"desk": "billing"}))
        .call_tool_when("charge", "route_to", json!({"desk": "billing"}))
        .call_tool_when("router", "route_to", json!({"desk": "technical"}));
    let support = LocalBackend::named("support")
        .latency(scale.first_chunk, scale.between_chunks)
        .call_tool_when("refund", "refund_status", json!({"order": "A-1042"}))
        .call_tool_when("invoice", "lookup_invoice", json!({"invoice": 1042}))
        .call_tool_when("error", "run_diagnostics", json!({"device": "router"}));
    Ok((Arc::new(router), Arc::new(support)))
}

/// The OpenAI-compatible server to run on, if one is given.
fn model_url() -> Option<String> {
    std::env::var("MODEL_URL").ok().filter(|u| !u.is_empty())
}

fn model_name() -> String {
    std::env::var("MODEL")
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "local".into())
}

/// What a customer of each desk asks, question after question.
fn questions(desk: &AgentKey<Desk>) -> [&'static str; 3] {
    match desk.name() {
        "refunds" => [
            "Where is the refund for order A-1042?",
            "How many days until the refund reaches my card?",
            "Great, I will watch for the refund. Thanks!",
        ],
        "billing" => [
            "I was charged twice for invoice 1042.",
            "Can you check the invoice and send me a corrected one?",
            "Thanks. Will the second charge show on my next statement?",
        ],
        _ => [
            "My router shows error 651 since this morning.",
            "I restarted the router and it still shows the error.",
            "The router works now, thank you!",
        ],
    }
}

/// What happens to one customer on purpose.
#[derive(Clone, Copy, PartialEq)]
enum Mishap {
    None,
    /// At the first chunk of its second reply, its desk's instance is killed.
    InstanceKilled,
    /// After three chunks of its first reply, its connection drops.
    ConnectionLost,
}

/// A customer's end of a session: a subscription whose every event must
/// be the one after the last it saw.
struct Client {
    name: String,
    id: String,
    sessions: Sessions,
    stream: SessionStream,
    /// Every event received, in order.
    received: Vec<Arc<SessionRecord>>,
    spotlight: bool,
    mishap: Mishap,
    /// While resuming: the last event seen, and the last journaled, when
    /// it reconnected.
    catching_up: Option<(u64, u64)>,
    /// Events missed while away and received once resumed.
    resumed: Option<u64>,
}

/// How a turn ended, as the customer saw it.
enum TurnEnd {
    Answered,
    Failed { retry_after: Option<Duration> },
}

impl Client {
    // ANCHOR: next
    /// The next event; an error if it is not the one after the last seen.
    async fn next(&mut self) -> troupe::Result<Arc<SessionRecord>> {
        loop {
            let item = tokio::time::timeout(TURN_TIMEOUT, self.stream.next())
                .await
                .map_err(|_| format!("{}: no event for {TURN_TIMEOUT:?}", self.name))?
                .ok_or("the subscription ended")??;
            let SessionItem::Event(rec) = item else {
                continue; // a heartbeat
            };
            let last = self.received.last().map_or(0, |r| r.seq);
            if rec.seq != last + 1 {
                return Err(format!("{}: seq {} after {last}", self.name, rec.seq).into());
            }
            self.received.push(rec.clone());
            if let Some((from, to)) = self.catching_up.filter(|&(_, to)| to == rec.seq) {
                let missed = to - from;
                log(
                    &self.name,
                    format!("got the {missed} events it missed, once each; live again"),
                );
                self.catching_up = None;
                self.resumed = Some(missed);
            }
            return Ok(rec);
        }
    }
    // ANCHOR_END: next

    // ANCHOR: reconnect
    /// Drops the connection, and resumes after the last event seen.
    async fn reconnect(&mut self, away: Duration) -> troupe::Result<()> {
        let last = self.received.last().map_or(0, |r| r.seq);
        self.stream = futures::stream::empty().boxed();
        log(&self.name, format!("connection lost after seq {last}"));
        tokio::time::sleep(away).await;
        let journaled = self.sessions.view(&self.id).await?.seq;
        self.stream = self.sessions.subscribe(&self.id, last).await?;
        log(
            &self.name,
            format!("reconnects after seq {last}; {journaled} events journaled"),
        );
        // The events it missed come first, from the journal, once each.
        self.catching_up = Some((last, journaled));
        Ok(())
    }
    // ANCHOR_END: reconnect

    /// Follows turn `turn` (question `q`, from 0) to its end.
    async fn follow(
        &mut self,
        troupe: &Troupe,
        q: usize,
        turn: u32,
        scale: &Scale,
    ) -> troupe::Result<TurnEnd> {
        let (mut reply, mut chunks, mut desk) = (String::new(), 0, String::new());
        loop {
            let rec = self.next().await?;
            match &rec.event {
                SessionEvent::HandedOff { turn: t, agent } if *t == turn => desk = agent.clone(),
                SessionEvent::TurnStarted {
                    turn: t, attempt, ..
                } if *t == turn => {
                    if *attempt > 1 {
                        log(
                            &self.name,
                            format!(
                                "turn {turn}: attempt {attempt} starts; drops \"{}\"",
                                short(&reply, 30)
                            ),
                        );
                    }
                    reply.clear();
                    chunks = 0;
                }
                SessionEvent::ModelChunk { turn: t, text } if *t == turn => {
                    reply.push_str(text);
                    chunks += 1;
                    match self.mishap {
                        Mishap::InstanceKilled if q == 1 && chunks == 1 => {
                            self.mishap = Mishap::None;
                            troupe.agent(&BILLING)?.kill_instance(&self.id);
                            log(
                                &desk,
                                format!(
                                    "instance of {} killed while it streams a reply",
                                    self.name
                                ),
                            );
                        }
                        Mishap::ConnectionLost if q == 0 && chunks == 3 => {
                            self.mishap = Mishap::None;
                            self.reconnect(scale.away).await?;
                        }
                        _ => {}
                    }
                }
                SessionEvent::TurnCompleted { turn: t, .. } if *t == turn => {
                    if self.spotlight {
                        log(
                            &self.name,
                            format!("{desk} answered: \"{}\"", short(&reply, 60)),
                        );
                    }
                    return Ok(TurnEnd::Answered);
                }
                SessionEvent::TurnFailed {
                    turn: t,
                    retry_after_ms,
                    ..
                } if *t == turn => {
                    return Ok(TurnEnd::Failed {
                        retry_after: retry_after_ms.map(Duration::from_millis),
                    });
                }
                _ => {}
            }
        }
    }
}

// ANCHOR: converse
/// A customer: asks each question, follows the reply, asks again after a
/// refusal (after its hint), then closes the session.
async fn converse(
    troupe: Arc<Troupe>,
    mut client: Client,
    questions: Vec<&'static str>,
    think: Duration,
    scale: Scale,
) -> troupe::Result<Client> {
    for (q, question) in questions.into_iter().enumerate() {
        let mut refusals = 0;
        loop {
            if client.spotlight {
                log(&client.name, format!("asks \"{question}\""));
            }
            // Posting journals the turn and hands it to triage.
            let posted = client.sessions.post(&client.id, question).await?;
            match client.follow(&troupe, q, posted.turn, &scale).await? {
                TurnEnd::Answered => break,
                TurnEnd::Failed { retry_after } => {
                    // A customer is patient, not endlessly so: the run then
                    // ends reporting the question unanswered.
                    refusals += 1;
                    if refusals == MAX_REFUSALS {
                        log(
                            &client.name,
                            format!("gives up on \"{question}\" after {refusals} refusals"),
                        );
                        break;
                    }
                    let wait = retry_after.unwrap_or(Duration::from_millis(200));
                    if retry_after.is_some() && !REFUSAL_FOLLOWED.swap(true, SeqCst) {
                        client.spotlight = true;
                        log(
                            &client.name,
                            format!("refused early; asks again in {} ms", wait.as_millis()),
                        );
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

/// The sizes of a run.
#[derive(Clone, Copy)]
struct Scale {
    gpus: u32,
    customers: usize,
    questions: usize,
    first_chunk: Duration,
    between_chunks: Duration,
    think: Duration,
    away: Duration,
    every: Duration,
}

impl Scale {
    fn new(quick: bool) -> Self {
        let ms = Duration::from_millis;
        if quick {
            Scale {
                gpus: 1,
                customers: 12,
                questions: 2,
                first_chunk: ms(4),
                between_chunks: ms(4),
                think: ms(20),
                away: ms(10),
                every: ms(100),
            }
        } else {
            Scale {
                gpus: 2,
                customers: 24,
                questions: 3,
                first_chunk: ms(20),
                between_chunks: ms(8),
                think: ms(150),
                away: ms(40),
                every: ms(250),
            }
        }
    }

    /// How long a reply holds its lease (the model's time and the journal
    /// writes between chunks, rounded up): the GPU supervisor's wait
    /// estimates, and so its refusals, build on it.
    fn hold(&self) -> Duration {
        (self.first_chunk + self.between_chunks * 20) * 2
    }
}

/// The events of turn `turn` of `client`, runs of chunks on one line.
fn print_turn(client: &Client, turn: u32) {
    let mut chunks: Option<(u64, u64, String)> = None;
    let flush = |c: &mut Option<(u64, u64, String)>| {
        if let Some((from, to, text)) = c.take() {
            println!(
                "    {:>7}  model_chunk ×{:<2} \"{}\"",
                format!("{from}-{to}"),
                to - from + 1,
                short(&text, 50)
            );
        }
    };
    for rec in client
        .received
        .iter()
        .filter(|r| r.event.turn() == Some(turn))
    {
        if let SessionEvent::ModelChunk { text, .. } = &rec.event {
            let c = chunks.get_or_insert((rec.seq, rec.seq, String::new()));
            c.1 = rec.seq;
            c.2.push_str(text);
            continue;
        }
        flush(&mut chunks);
        let line = match &rec.event {
            SessionEvent::UserTurn { text, .. } => format!("user_turn       \"{text}\""),
            SessionEvent::HandedOff { agent, .. } => format!("handed_off      to {agent}"),
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
            other => format!("{other:?}"),
        };
        println!("    {:>7}  {line}", rec.seq);
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
async fn main() -> troupe::Result<()> {
    LazyLock::force(&START);
    let args: Vec<String> = std::env::args().collect();
    let scale = Scale::new(args.iter().any(|a| a == "--quick"));
    let temp = tempfile::tempdir()?;
    let data_dir = match args.iter().position(|a| a == "--data-dir") {
        Some(i) => std::path::PathBuf::from(args.get(i + 1).ok_or("--data-dir needs a directory")?),
        None => temp.path().to_owned(),
    };
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)?;
    }
    let real_model = model_url();

    // ANCHOR: system
    // Sessions are journaled with fsync; lease decisions in a buffered
    // journal of their own. Every agent runs one instance per session.
    let (router, support) = models(&scale)?;
    let mut builder = Troupe::builder()
        .data_dir(&data_dir)
        .gpus(Arc::new(SimulatedProbe::new(scale.gpus, 80 * GB)))
        .shared_backend("router", router)
        .shared_backend("support", support)
        .agent(&TRIAGE, Triage, triage_options())
        .agent(&WALLBOARD, Wallboard, AgentOptions::default());
    for desk in DESKS {
        builder = builder.agent(&desk, Desk, desk_options(&desk, scale.hold()));
    }
    let troupe = Arc::new(builder.build().await?);
    // ANCHOR_END: system

    let gpus = if scale.gpus == 1 {
        "1 simulated 80 GB GPU".into()
    } else {
        format!("{} simulated 80 GB GPUs", scale.gpus)
    };
    let model = real_model.as_deref().map_or("the local model".into(), |u| {
        format!("{} at {u}", model_name())
    });
    println!(
        "support desk: {} customers, {} questions each, all at once, on {gpus}, answered by {model}",
        scale.customers, scale.questions
    );
    println!("journals in {}\n", data_dir.display());

    let reporter = {
        let troupe = troupe.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(scale.every);
            loop {
                every.tick().await;
                if report(&troupe).await.is_err() {
                    break;
                }
            }
        })
    };
    // ANCHOR: customers
    let mut customers = Vec::new();
    for i in 0..scale.customers {
        let desk = DESKS[i % DESKS.len()];
        let mishap = match i {
            0 => Mishap::ConnectionLost, // the first refunds customer
            1 => Mishap::InstanceKilled, // the first billing customer
            _ => Mishap::None,
        };
        let sessions = troupe.sessions().clone();
        let id = sessions.create(TRIAGE.name(), None).await?;
        let stream = sessions.subscribe(&id, 0).await?;
        let client = Client {
            name: format!("cust-{:02}", i + 1),
            id,
            sessions,
            stream,
            received: Vec::new(),
            spotlight: mishap != Mishap::None,
            mishap,
            catching_up: None,
            resumed: None,
        };
        let questions = questions(&desk)[..scale.questions].to_vec();
        let think = scale.think * (1 + i as u32 % 3);
        customers.push(tokio::spawn(converse(
            troupe.clone(),
            client,
            questions,
            think,
            scale,
        )));
    }
    let mut clients = Vec::new();
    for c in customers {
        clients.push(c.await.map_err(|e| e.to_string())??);
    }
    // ANCHOR_END: customers
    let elapsed = START.elapsed();
    reporter.abort();
    report(&troupe).await?;

    // What the journal holds, against what each customer received.
    let (mut answered, mut tool_calls, mut hints, mut events) = (0, 0, Vec::new(), 0);
    let (mut again, mut mismatched) = (Vec::new(), Vec::new());
    for c in &clients {
        let pid = troupe::agent::session::session_pid(&c.id)?;
        let journaled = troupe
            .journal()
            .replay(&pid, 1, u64::MAX)
            .collect_all()
            .await?;
        events += journaled.len();
        let mut same = journaled.len() == c.received.len();
        for (persisted, received) in journaled.iter().zip(&c.received) {
            let event: SessionEvent = persisted.decode()?;
            same &= persisted.seq == received.seq && event == received.event;
            match event {
                SessionEvent::TurnCompleted { .. } => answered += 1,
                SessionEvent::ToolCalled { .. } => tool_calls += 1,
                SessionEvent::TurnFailed {
                    retry_after_ms: Some(ms),
                    ..
                } => hints.push(ms),
                SessionEvent::TurnStarted { turn, attempt, .. } if attempt > 1 => {
                    again.push((c.name.clone(), c.id.clone(), turn))
                }
                _ => {}
            }
        }
        if !same {
            mismatched.push(c.name.clone());
        }
    }
    let tallies = troupe.agent(&WALLBOARD)?.get("main").ask(Read).await?;
    let billing = troupe.agent(&BILLING)?;
    let restarts = billing.restarts();
    // The killed turn: answered again without calling its tool again.
    let reused = again.first().map(|(name, _, turn)| {
        let c = clients.iter().find(|c| &c.name == name).expect("client");
        c.received
            .iter()
            .filter(|r| matches!(&r.event, SessionEvent::ToolCalled { turn: t, .. } if t == turn))
            .count()
            == 1
    });
    let remembered = match clients.get(1) {
        Some(c) => billing.get(&c.id).ask(Answered).await?,
        None => 0,
    };
    let resumed = clients.iter().find_map(|c| c.resumed);
    let held: u64 = troupe
        .gpu()
        .ok_or("no GPUs")?
        .status()
        .await?
        .iter()
        .map(|s| s.leased.0)
        .sum();
    let questions = scale.customers * scale.questions;
    let mean_hint = hints.iter().sum::<u64>() / hints.len().max(1) as u64;

    let row = |what: &str, n: u128, note: &str| {
        println!("{}", format!("  {what:<26} {n:>6}  {note}").trim_end())
    };
    println!("\nsummary");
    row("customers", clients.len() as u128, "");
    row(
        "questions answered",
        answered as u128,
        &format!("of {questions}, with {tool_calls} tool calls"),
    );
    for (desk, n) in &tallies.answered {
        row(
            &format!("  by {desk}"),
            *n as u128,
            "on the wallboard, its journaled state",
        );
    }
    let refused: u32 = tallies.refused.values().sum();
    row(
        "GPU leases refused early",
        refused as u128,
        &format!("turns asked again after the hint (mean {mean_hint} ms)"),
    );
    row(
        "instances restarted",
        restarts as u128,
        "the billing instance killed mid-reply",
    );
    row(
        "turns answered again",
        again.len() as u128,
        "a new attempt, reusing the journaled tool result",
    );
    row(
        "questions cust-02 asked",
        remembered as u128,
        "as its billing instance remembers them",
    );
    row(
        "missed events on resuming",
        resumed.unwrap_or(0) as u128,
        "each received once, none twice",
    );
    row(
        "events journaled",
        events as u128,
        "each received once, in order, by its customer",
    );
    row("GPU memory still leased", held as u128, "bytes");
    row("run time", elapsed.as_millis(), "ms");
    if let Some((name, _, turn)) = again.first() {
        println!("\n{name}'s turn {turn}, as journaled:");
        if let Some(c) = clients.iter().find(|c| &c.name == name) {
            print_turn(c, *turn);
        }
    }
    troupe.shutdown().await?;

    // A real model decides for itself whether to call tools, so only the
    // local model's run is held to every line of the story.
    let strict = real_model.is_none();
    let missing: Vec<&str> = [
        ("every question answered", answered == questions),
        (
            "an early refusal with a retry hint",
            !strict || !hints.is_empty(),
        ),
        ("one restart, of the killed instance", restarts == 1),
        ("the interrupted turn answered again", !again.is_empty()),
        (
            "its tool result reused, not called again",
            !strict || reused == Some(true),
        ),
        ("missed events received on resuming", resumed > Some(0)),
        ("transcripts equal to the journal", mismatched.is_empty()),
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
    println!("\ndone: routed, streamed, refused and retried, crashed and answered again, resumed");
    Ok(())
}
