//! A tour of the journal: three support tickets journal their events, the
//! process "restarts" (the journal is closed and reopened), and each ticket
//! is rebuilt from its events; a projection follows every escalation
//! through a tag subscription.
//!
//! Run with `cargo run --release --example journal_tour` (`make demo`).
//! `--quick` journals fewer events; `--data-dir DIR` chooses where.

use std::collections::BTreeMap;
use std::path::PathBuf;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use troupe::prelude::*;

// ANCHOR: events
/// What can happen to a support ticket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
enum TicketEvent {
    Opened { customer: String, subject: String },
    Replied { by: String, text: String },
    Escalated { to: String },
    Closed,
}

impl Schema for TicketEvent {
    const TYPE_NAME: &'static str = "ticket.Event";
}
// ANCHOR_END: events

// ANCHOR: state
/// A ticket as rebuilt from its events.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
struct Ticket {
    customer: String,
    subject: String,
    replies: u32,
    escalated_to: Option<String>,
    closed: bool,
}

impl Schema for Ticket {
    const TYPE_NAME: &'static str = "ticket.State";
}

impl Ticket {
    fn apply(mut self, event: TicketEvent) -> Self {
        match event {
            TicketEvent::Opened { customer, subject } => {
                self.customer = customer;
                self.subject = subject;
            }
            TicketEvent::Replied { .. } => self.replies += 1,
            TicketEvent::Escalated { to } => self.escalated_to = Some(to),
            TicketEvent::Closed => self.closed = true,
        }
        self
    }
}
// ANCHOR_END: state

fn script(n: usize, rounds: usize) -> Vec<TicketEvent> {
    let customers = ["ada", "grace", "linus"];
    let mut events = vec![TicketEvent::Opened {
        customer: customers[n % 3].into(),
        subject: [
            "refund for order 1182",
            "GPU quota exceeded",
            "invoice address",
        ][n % 3]
            .into(),
    }];
    for r in 0..rounds {
        events.push(TicketEvent::Replied {
            by: if r % 2 == 0 { "triage" } else { "customer" }.into(),
            text: format!("message {r}"),
        });
    }
    if n != 2 {
        events.push(TicketEvent::Escalated {
            to: ["billing", "technical"][n % 2].into(),
        });
    }
    if n == 0 {
        events.push(TicketEvent::Closed);
    }
    events
}

#[tokio::main]
async fn main() -> troupe::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let data_dir = args
        .iter()
        .position(|a| a == "--data-dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("troupe-data/journal_tour"));
    let rounds = if quick { 3 } else { 40 };
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)?;
    }
    println!("journal at {} (fsync durability)", data_dir.display());

    // ANCHOR: append
    let journal = RocksJournal::open(RocksConfig::new(&data_dir).durability(Durability::Fsync))?;
    let escalations = Tag::parse("escalation")?;
    let mut written = BTreeMap::new();
    for n in 0..3 {
        let id = PersistenceId::new("ticket", &format!("T-{}", 1000 + n))?;
        let mut seq = journal.highest_seq(&id).await?;
        for event in script(n, rounds) {
            let mut new = NewEvent::new(&event)?;
            if matches!(event, TicketEvent::Escalated { .. }) {
                new = new.with_tag(escalations.clone())?;
            }
            // `seq` is the sequence we believe is current: a stale writer
            // would get `SeqConflict` instead of overwriting anything.
            seq = journal.append(&id, seq, vec![new]).await?.last_seq;
        }
        println!("  {id}: journaled {seq} events");
        written.insert(id, seq);
    }
    // ANCHOR_END: append
    // Snapshot the first ticket a few events before its end, so that its
    // recovery below loads the snapshot and replays only what came after.
    let first_id = written.keys().next().ok_or("no tickets")?.clone();
    let snap_seq = written[&first_id].saturating_sub(3).max(1);
    let state_at_snap = journal
        .replay(&first_id, 1, snap_seq)
        .try_fold_events(Ticket::default(), |t, ev| Ok(t.apply(ev.decode()?)))
        .await?;
    journal
        .save_snapshot(&first_id, NewSnapshot::new(snap_seq, &state_at_snap)?)
        .await?;
    println!("  {first_id}: snapshot saved at #{snap_seq}");
    journal.close().await;
    drop(journal);
    println!("journal closed; reopening as after a restart");

    // ANCHOR: recover
    let journal = RocksJournal::open(RocksConfig::new(&data_dir))?;
    for (id, highest) in &written {
        let (start, from_seq) = match journal.load_snapshot(id).await? {
            Some(s) => (s.decode::<Ticket>()?, s.seq + 1),
            None => (Ticket::default(), 1),
        };
        let ticket = journal
            .replay(id, from_seq, u64::MAX)
            .try_fold_events(start, |t, ev| Ok(t.apply(ev.decode()?)))
            .await?;
        // ANCHOR_END: recover
        assert_eq!(journal.highest_seq(id).await?, *highest);
        println!(
            "  {id}: recovered from {} ({} events replayed): {} / {:?}, {} replies, escalated to {}, {}",
            if from_seq > 1 { "snapshot" } else { "events" },
            highest + 1 - from_seq,
            ticket.customer,
            ticket.subject,
            ticket.replies,
            ticket.escalated_to.as_deref().unwrap_or("nobody"),
            if ticket.closed { "closed" } else { "open" },
        );
    }

    // ANCHOR: subscribe
    let mut escalated = journal.subscribe_tag(&escalations, 1);
    let mut seen = 0;
    while seen < 2 {
        let tagged = escalated.next().await.ok_or("journal closed")??;
        let event: TicketEvent = tagged.event.decode()?;
        println!(
            "  escalation at offset {}: {} {:?}",
            tagged.offset, tagged.event.id, event
        );
        seen += 1;
    }
    // ANCHOR_END: subscribe
    drop(escalated);
    journal.close().await;
    println!("done: 3 tickets journaled, recovered after reopen, escalations projected");
    Ok(())
}
