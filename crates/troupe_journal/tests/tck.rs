//! The conformance suite against both backends.

use tempfile::TempDir;
use troupe_journal::tck::TckHarness;
use troupe_journal::{Durability, InMemoryJournal, PersistenceId, RocksConfig, RocksJournal};

struct Memory {
    journal: InMemoryJournal,
}

#[async_trait::async_trait]
impl TckHarness for Memory {
    type Journal = InMemoryJournal;
    async fn open(&mut self) -> InMemoryJournal {
        self.journal.reopen()
    }
    async fn close(&mut self, _journal: InMemoryJournal) {}
    async fn overwrite_raw(
        &mut self,
        j: &InMemoryJournal,
        id: &PersistenceId,
        seq: u64,
        bytes: &[u8],
    ) {
        assert!(
            j.overwrite_raw(id, seq, bytes.to_vec()),
            "no event {id} #{seq}"
        );
    }
    fn replay_batch_size(&self) -> usize {
        64
    }
}

struct Rocks {
    dir: TempDir,
    durability: Durability,
}

impl Rocks {
    fn new(durability: Durability) -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            durability,
        }
    }
}

#[async_trait::async_trait]
impl TckHarness for Rocks {
    type Journal = RocksJournal;
    async fn open(&mut self) -> RocksJournal {
        let config = RocksConfig::new(self.dir.path())
            .durability(self.durability)
            .replay_batch_size(64);
        // A closed handle's last references (blocking readers, aborted
        // subscription tasks) may take a moment to drop and release the lock.
        for _ in 0..100 {
            match RocksJournal::open(config.clone()) {
                Ok(j) => return j,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
        RocksJournal::open(config).expect("reopen the journal")
    }
    async fn close(&mut self, journal: RocksJournal) {
        journal.close().await;
    }
    async fn overwrite_raw(
        &mut self,
        j: &RocksJournal,
        id: &PersistenceId,
        seq: u64,
        bytes: &[u8],
    ) {
        j.overwrite_raw(id, seq, bytes).expect("overwrite");
    }
    fn replay_batch_size(&self) -> usize {
        64
    }
}

/// The tiered journal with a small hot tail, and every event archived to
/// the cold tier at each restart: the suite's checks after a reopen read
/// from segments.
struct Tiered {
    dir: TempDir,
}

#[async_trait::async_trait]
impl TckHarness for Tiered {
    type Journal = troupe_journal::TieredJournal;
    async fn open(&mut self) -> troupe_journal::TieredJournal {
        let warm = Rocks {
            dir: tempfile::tempdir().expect("unused"),
            durability: Durability::Fsync,
        };
        let mut warm = Rocks {
            dir: std::mem::replace(&mut self.dir, warm.dir),
            ..warm
        };
        let journal = warm.open().await;
        self.dir = warm.dir;
        let mut config = troupe_journal::TierConfig::default();
        config.hot.default.max_events = 8;
        config.archive.archive_after_s = Some(0);
        config.archive.min_segment_events = 1;
        config.archive.max_segment_events = 40;
        let cold = troupe_journal::tiered::open_object_store(
            &troupe_journal::ColdConfig::default(),
            &self.dir.path().join("cold"),
        )
        .expect("cold store");
        troupe_journal::TieredJournal::new(journal, cold, config).expect("tiered")
    }
    async fn close(&mut self, journal: troupe_journal::TieredJournal) {
        journal
            .archive_all(troupe_journal::now_ms() + 1, |_, _| {})
            .await
            .expect("archive on close");
        journal.close().await;
    }
    async fn overwrite_raw(
        &mut self,
        j: &troupe_journal::TieredJournal,
        id: &PersistenceId,
        seq: u64,
        bytes: &[u8],
    ) {
        j.warm().overwrite_raw(id, seq, bytes).expect("overwrite");
    }
    fn replay_batch_size(&self) -> usize {
        64
    }
}

mod tiered {
    use super::*;
    troupe_journal::journal_tck!(Tiered {
        dir: tempfile::tempdir().expect("temp dir")
    });
}

mod memory {
    use super::*;
    troupe_journal::journal_tck!(Memory {
        journal: InMemoryJournal::new().with_replay_batch_size(64)
    });
}

mod rocks_fsync {
    use super::*;
    troupe_journal::journal_tck!(Rocks::new(Durability::Fsync));
}

mod rocks_buffered {
    use super::*;
    troupe_journal::journal_tck!(Rocks::new(Durability::Buffered));
}

/// A journal opened inside one runtime keeps answering appends made from
/// another, even when the first is a current-thread runtime nobody drives.
#[test]
fn a_journal_outlives_the_runtime_it_was_opened_in() {
    use troupe_journal::{Journal, NewEvent};
    let dir = tempfile::tempdir().expect("tempdir");
    for flavor in ["current", "multi"] {
        let opener = match flavor {
            "current" => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            _ => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build(),
        }
        .expect("runtime");
        let path = dir.path().join(flavor);
        let journal = opener
            .block_on(async { RocksJournal::open(RocksConfig::new(&path)) })
            .expect("open");
        let user = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let id = PersistenceId::parse("rt/1").expect("id");
        user.block_on(async {
            let ev = NewEvent::raw("t", 1, vec![0xc0]).expect("event");
            let out = tokio::time::timeout(
                std::time::Duration::from_secs(20),
                journal.append(&id, 0, vec![ev]),
            )
            .await
            .expect("append answered")
            .expect("append");
            assert_eq!(out.last_seq, 1);
        });
        drop(opener);
        user.block_on(async {
            let ev = NewEvent::raw("t", 1, vec![0xc0]).expect("event");
            let out = tokio::time::timeout(
                std::time::Duration::from_secs(20),
                journal.append(&id, 1, vec![ev]),
            )
            .await
            .expect("append answered after the opening runtime is gone")
            .expect("append");
            assert_eq!(out.last_seq, 2);
            journal.close().await;
        });
    }
}
