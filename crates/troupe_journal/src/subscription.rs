//! Tag subscriptions shared by every backend: catch up from storage, then
//! follow the live feed, with no gap or duplicate at the seam.
//!
//! The live receiver is created *before* the first storage read. Every event
//! committed before that read is found by it; every event committed after
//! the receiver existed is on the feed; events in both are filtered by their
//! offset. If the feed overflows (a slow subscriber), or skips an offset (an
//! event its backend did not publish), the task goes back to storage from
//! the last offset it delivered.

use tokio::sync::{broadcast, mpsc};

use crate::error::{JournalError, Result};
use crate::event::TaggedEvent;
use crate::id::Tag;
use crate::journal::{Journal, TagSubscription};

/// Events read from storage per catch-up query.
pub const CATCH_UP_PAGE: usize = 512;
/// Events buffered between the subscription task and its consumer.
pub const SUBSCRIBER_BUFFER: usize = 256;
/// Capacity of a backend's live feed of tagged events.
pub const LIVE_FEED_CAPACITY: usize = 4096;

/// Starts a subscription task over `journal`, fed live by `live` (a
/// backend's broadcast of the tagged events it commits, subscribed to
/// before this call). For backends implementing
/// [`Journal::subscribe_tag`].
pub fn spawn<J: Journal + Clone>(
    journal: J,
    live: broadcast::Receiver<TaggedEvent>,
    tag: Tag,
    from_offset: u64,
) -> TagSubscription {
    if tokio::runtime::Handle::try_current().is_err() {
        return TagSubscription::failed(JournalError::NoRuntime("subscribe_tag"));
    }
    let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
    let task = tokio::spawn(run(journal, live, tag, from_offset.max(1), tx));
    TagSubscription::new(rx, task)
}

async fn catch_up<J: Journal>(
    journal: &J,
    tag: &Tag,
    next: &mut u64,
    tx: &mpsc::Sender<Result<TaggedEvent>>,
) -> std::result::Result<(), ()> {
    loop {
        let page = match journal.events_by_tag(tag, *next, CATCH_UP_PAGE).await {
            Ok(page) => page,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return Err(());
            }
        };
        let full = page.len() == CATCH_UP_PAGE;
        for ev in page {
            *next = ev.offset + 1;
            tx.send(Ok(ev)).await.map_err(|_| ())?;
        }
        if !full {
            return Ok(());
        }
    }
}

async fn run<J: Journal>(
    journal: J,
    mut live: broadcast::Receiver<TaggedEvent>,
    tag: Tag,
    mut next: u64,
    tx: mpsc::Sender<Result<TaggedEvent>>,
) {
    if catch_up(&journal, &tag, &mut next, &tx).await.is_err() {
        return;
    }
    // Offsets on the feed are consecutive (every tagged event of every tag
    // is on it, in commit order). A hole means events the feed did not
    // carry (published late, or by a writer that never published them):
    // they are in storage, so read from there before going on. Before the
    // first live event there is no previous offset to compare with, so that
    // one always checks storage.
    let mut feed_last: Option<u64> = None;
    loop {
        match live.recv().await {
            Ok(ev) => {
                // The first event after a catch-up may follow a hole too: a
                // batch that committed between the catch-up's read and this
                // receiver's first event may not have been published to it.
                let hole = feed_last.is_none_or(|l| ev.offset > l + 1);
                if hole && catch_up(&journal, &tag, &mut next, &tx).await.is_err() {
                    return;
                }
                feed_last = Some(feed_last.map_or(ev.offset, |l| l.max(ev.offset)));
                if ev.offset >= next && ev.event.tags.contains(&tag) {
                    next = ev.offset + 1;
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Missed live events are in storage: read them from there.
                if catch_up(&journal, &tag, &mut next, &tx).await.is_err() {
                    return;
                }
                feed_last = None;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
