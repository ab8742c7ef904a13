//! Durable conversations under supervision: each conversation is an
//! event-sourced entity (every turn is journaled before it is acknowledged),
//! a supervised "moderator" worker crashes midway and is restarted, idle
//! conversations are passivated and come back with their history, and the
//! whole system shuts down in order (also on Ctrl-C).
//!
//! Run with `cargo run --release --example durable_agents`.
//! `--quick` does fewer turns; `--data-dir DIR` chooses where.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use troupe::prelude::*;
use troupe::ractor::{self, ActorProcessingErr, ActorRef};

// ANCHOR: entity
/// A conversation: its turns are the events.
struct Conversation;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Turn {
    speaker: String,
    text: String,
}
impl Schema for Turn {
    const TYPE_NAME: &'static str = "conversation.Turn";
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct History {
    turns: Vec<Turn>,
}
impl Schema for History {
    const TYPE_NAME: &'static str = "conversation.History";
}

enum ConversationCmd {
    /// Journal a turn; reply with its position in the conversation.
    Say(Turn, RpcReplyPort<usize>),
    /// The whole history.
    History(RpcReplyPort<History>),
}

impl EventSourced for Conversation {
    type Command = ConversationCmd;
    type Event = Turn;
    type State = History;
    const KIND: &'static str = "conversation";

    fn handle(&self, state: &History, cmd: ConversationCmd) -> Effect<Self> {
        match cmd {
            // Persisted, then applied, then the reply runs with the new state.
            ConversationCmd::Say(turn, reply) => {
                Effect::persist_one(turn).reply(reply, |h: &History| h.turns.len())
            }
            ConversationCmd::History(reply) => {
                let h = state.clone();
                Effect::none().reply(reply, move |_: &History| h)
            }
        }
    }

    fn apply(state: &mut History, turn: &Turn) {
        state.turns.push(turn.clone());
    }
}
// ANCHOR_END: entity

// ANCHOR: worker
/// A plain ractor actor: flags turns, and crashes on the word "crash".
struct Moderator {
    starts: Arc<AtomicU32>,
}

enum ModeratorMsg {
    Check(String, RpcReplyPort<bool>),
}

impl ractor::Actor for Moderator {
    type Msg = ModeratorMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<ModeratorMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        let n = self.starts.fetch_add(1, Ordering::SeqCst) + 1;
        println!("  moderator: incarnation {n} started");
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<ModeratorMsg>,
        msg: ModeratorMsg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        let ModeratorMsg::Check(text, reply) = msg;
        if text.contains("crash") {
            return Err(format!("moderator cannot parse {text:?}").into());
        }
        let _ = reply.send(!text.contains("refund"));
        Ok(())
    }
}
// ANCHOR_END: worker

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

#[tokio::main]
async fn main() -> troupe::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let data_dir = arg("--data-dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("troupe-data/durable_agents"));
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)?;
    }
    let turns = if quick { 4 } else { 25 };

    // ANCHOR: system
    let starts = Arc::new(AtomicU32::new(0));
    let s = starts.clone();
    let (moderator_spec, moderator) =
        ChildSpec::actor("moderator", Restart::Permanent, 64, move || {
            (Moderator { starts: s.clone() }, ())
        });
    let troupe = Troupe::builder()
        .data_dir(&data_dir)
        .durability(Durability::Fsync)
        .root(
            SupervisorSpec::new("root")
                .strategy(Strategy::OneForOne)
                .intensity(5, Duration::from_secs(10))
                .child(moderator_spec),
        )
        .build()
        .await?;
    let conversations = troupe.entities(
        Conversation,
        EntityConfig {
            idle_timeout: Some(Duration::from_millis(200)),
            ..EntityConfig::default()
        },
    );
    // ANCHOR_END: system
    println!("system up: journal at {}", data_dir.display());

    let work = async {
        let t = Duration::from_secs(10);
        for n in 0..turns {
            for (key, speaker) in [("alice", "customer"), ("bob", "customer")] {
                let text = if n == 2 && key == "bob" {
                    "please crash".to_string()
                } else {
                    format!("message {n} from {key}")
                };
                // ANCHOR: ask
                let allowed = match moderator
                    .ask(|r| ModeratorMsg::Check(text.clone(), r), t)
                    .await
                {
                    Ok(ok) => ok,
                    // The moderator crashed on this message; its supervisor restarts it.
                    Err(e) => {
                        println!(
                            "  moderator failed on {text:?} ({e}); the turn is journaled unmoderated"
                        );
                        true
                    }
                };
                let turn = Turn {
                    speaker: speaker.into(),
                    text,
                };
                let position = conversations
                    .ask(key, |r| ConversationCmd::Say(turn, r), t)
                    .await?;
                // ANCHOR_END: ask
                if n == 0 || n + 1 == turns {
                    println!(
                        "  {key}: turn {position} journaled (moderation {})",
                        if allowed { "passed" } else { "flagged" }
                    );
                }
            }
        }
        println!("waiting for idle conversations to be passivated...");
        let passivated = async {
            while conversations.active_count() > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), passivated)
            .await
            .map_err(|_| "conversations were not passivated within 30 s")?;
        println!("  all conversations passivated (no actor, no task left)");
        for key in ["alice", "bob"] {
            let history = conversations.ask(key, ConversationCmd::History, t).await?;
            println!(
                "  {key}: reactivated from the journal with {} turns",
                history.turns.len()
            );
            assert_eq!(history.turns.len(), turns);
        }
        Ok::<_, troupe::Error>(())
    };
    tokio::select! {
        r = work => r?,
        _ = tokio::signal::ctrl_c() => println!("Ctrl-C: shutting down"),
    }
    let restarts = troupe.root().children(Duration::from_secs(5)).await?[0].restarts;
    troupe.shutdown().await?;
    println!(
        "done: {} turns journaled, moderator restarted {restarts} time(s), {} incarnations, clean shutdown",
        2 * turns,
        starts.load(Ordering::SeqCst)
    );
    Ok(())
}
