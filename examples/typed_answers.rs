//! Typed answers: a triage agent reads support emails and answers each with
//! a `Ticket`, a Rust type whose JSON schema the model is given. The model
//! here forgets a field the first time it answers a session; the answer is
//! rejected (journaled, with the field named), the model is told what was
//! wrong, and its second answer is the typed value the agent gets. The
//! book's chapter "Typed answers" walks through it.
//!
//! Run with `cargo run --example typed_answers`. It uses the deterministic
//! local model; `MODEL_URL=http://127.0.0.1:11434/v1 MODEL=llama3.2` runs
//! it against any OpenAI-compatible server that supports `response_format`
//! (Ollama, vLLM, llama.cpp's server). `--data-dir DIR` chooses where the
//! journal goes; `--quick` is accepted (it is always quick).

use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use troupe::agent::{ChatRequest, Chunk, ChunkStream, ModelBackend, Role};
use troupe::prelude::*;

// ANCHOR: types
/// What the triage agent must answer with. Doc comments become the
/// schema's descriptions, which the model reads.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
struct Ticket {
    /// Which desk handles it.
    desk: Desk,
    /// How soon someone must look at it.
    urgency: Urgency,
    /// One sentence a person can act on.
    summary: String,
    /// The order the customer names, if any.
    order: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
enum Desk {
    Billing,
    Technical,
    Shipping,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
enum Urgency {
    Today,
    ThisWeek,
}
// ANCHOR_END: types

// ANCHOR: agent
/// Files every email it is given as a ticket.
struct Triage;

const TRIAGE: AgentKey<Triage> = AgentKey::new("triage");

impl Agent for Triage {
    /// The tickets filed in this session.
    type State = Vec<String>;

    async fn on_turn(
        &self,
        filed: &mut Vec<String>,
        ctx: &mut Context<Self>,
    ) -> Result<(), AgentError> {
        // The schema goes with every model call of the turn; an answer
        // that does not fit is sent back (at most `max_repairs` times).
        let Typed { value, outcome } = ctx.reply_as::<Ticket>().await?;
        tracing::info!(chunks = outcome.chunks, "filed a {:?} ticket", value.desk);
        filed.push(value.summary);
        Ok(())
    }
}
// ANCHOR_END: agent

/// A model that leaves out `urgency` the first time it answers a
/// conversation, as small models do.
struct Forgetful(Arc<dyn ModelBackend>);

#[troupe::async_trait]
impl ModelBackend for Forgetful {
    fn name(&self) -> &str {
        "local"
    }

    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream, AgentError> {
        let first = !request.messages.iter().any(|m| m.role == Role::Assistant);
        let inner = self.0.stream(request).await?;
        if !first {
            return Ok(inner);
        }
        let chunks: Vec<_> = inner.collect().await;
        let text: String = chunks
            .iter()
            .filter_map(|c| match c {
                Ok(Chunk::Text(t)) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if let Some(m) = value.as_object_mut() {
            m.remove("urgency");
        }
        let mut out = vec![Ok(Chunk::Text(value.to_string()))];
        out.extend(
            chunks
                .into_iter()
                .filter(|c| matches!(c, Ok(Chunk::Done { .. }))),
        );
        Ok(futures::stream::iter(out).boxed())
    }
}

#[tokio::main]
async fn main() -> troupe::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let temp = tempfile::tempdir()?;
    let data_dir = match args.iter().position(|a| a == "--data-dir") {
        Some(i) => PathBuf::from(args.get(i + 1).ok_or("--data-dir needs a directory")?),
        None => temp.path().to_owned(),
    };
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)?;
    }
    let url = std::env::var("MODEL_URL").ok().filter(|u| !u.is_empty());
    let (model, options): (Arc<dyn ModelBackend>, _) = match &url {
        Some(url) => {
            let name = std::env::var("MODEL").unwrap_or_else(|_| "llama3.2".into());
            let server = OpenAiBackend::new(OpenAiConfig::new(url).name("local"))?;
            println!("model: {name} at {url}");
            (
                Arc::new(server),
                AgentOptions::default().model("local", name),
            )
        }
        None => (
            Arc::new(Forgetful(Arc::new(LocalBackend::default()))),
            AgentOptions::default(),
        ),
    };
    // ANCHOR: system
    let options = options
        .system_prompt("You triage support emails. Answer with the ticket as JSON, nothing else.");
    let troupe = Troupe::builder()
        .data_dir(&data_dir)
        .shared_backend("local", model)
        .agent(&TRIAGE, Triage, options)
        .build()
        .await?;
    // ANCHOR_END: system
    let sessions = troupe.sessions();
    let id = sessions.create(TRIAGE.name(), None).await?;
    for email in [
        "I was charged twice for order A-1042, please refund one of them.",
        "My router blinks red since this morning and nothing loads.",
    ] {
        println!("email:    {email}");
        let posted = sessions.post(&id, email).await?;
        // The turn's text is the answer's JSON, as the agent got it.
        let outcome = troupe.agents().wait_turn_end(&id, posted.turn).await?;
        let ticket: Ticket = serde_json::from_str(&outcome.text)?;
        println!(
            "ticket:   {:?} desk, {:?}, order {}: {}",
            ticket.desk,
            ticket.urgency,
            ticket.order.as_deref().unwrap_or("-"),
            ticket.summary
        );
        if let Some(u) = outcome.usage {
            println!(
                "          {} tokens in, {} out",
                u.prompt_tokens, u.completion_tokens
            );
        }
    }

    // ANCHOR: journal
    // What the journal holds: each rejected answer, with the field named.
    let mut events = sessions.subscribe(&id, 0).await?;
    let last = sessions.view(&id).await?.seq;
    while let Some(item) = events.next().await {
        let SessionItem::Event(record) = item? else {
            continue;
        };
        if let SessionEvent::AnswerRejected { turn, field, .. } = &record.event {
            println!("journal:  turn {turn}: answer rejected at `{field}`, model asked again");
        }
        if record.seq == last {
            break;
        }
    }
    // ANCHOR_END: journal
    troupe.shutdown().await?;
    Ok(())
}
