//! Micro-benchmarks of the RocksDB journal, each beside raw RocksDB doing
//! the same work with the same options, in the same run: one append of one
//! event (fsync'd and buffered) by one writer at a time, against one
//! `put` of the same key and bytes with the same write options; a replay of
//! 10,000 events against a raw iterator over the same keys.
//!
//! One writer at a time measures the latency of an append; group commit
//! (many writers sharing one write) is `troupe bench journal`'s business.
//!
//! `cargo bench --bench journal`.

use futures::StreamExt;
use rocksdb::{DB, WriteOptions};
use tokio::runtime::Runtime;
use troupe_journal::rocks::keys::{CF_EVENTS, event_key, upper_bound};
use troupe_journal::{
    Durability, Journal, NewEvent, PersistenceId, RocksConfig, RocksJournal, replay_read_options,
};

use divan::Bencher;

/// Payload bytes of each event.
const PAYLOAD: usize = 200;
/// Events per replay sample.
const REPLAYED: u64 = 10_000;

fn main() {
    divan::main();
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn event() -> NewEvent {
    NewEvent::raw("bench.Event", 1, vec![0x5a; PAYLOAD]).expect("event")
}

/// The bytes the journal stores for `event()` (its envelope).
fn envelope() -> Vec<u8> {
    let mut buf = Vec::new();
    event().encode_envelope(&mut buf);
    buf
}

fn id() -> PersistenceId {
    PersistenceId::parse("bench/w0").expect("id")
}

fn troupe_append(b: Bencher, durability: Durability) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("dir");
    let journal =
        RocksJournal::open(RocksConfig::new(dir.path()).durability(durability)).expect("open");
    let id = id();
    let mut seq = 0u64;
    b.bench_local(|| {
        seq = rt
            .block_on(journal.append(&id, seq, vec![event()]))
            .expect("append")
            .last_seq;
    });
    rt.block_on(journal.close());
}

fn raw_put(b: Bencher, durability: Durability) {
    let dir = tempfile::tempdir().expect("dir");
    let (opts, cfs) = RocksConfig::new(dir.path()).db_options();
    let db = DB::open_cf_descriptors(&opts, dir.path(), cfs).expect("open");
    let cf = db.cf_handle(CF_EVENTS).expect("events column family");
    let mut wo = WriteOptions::default();
    wo.set_sync(durability == Durability::Fsync);
    let (id, value) = (id(), envelope());
    let mut seq = 0u64;
    b.bench_local(|| {
        seq += 1;
        db.put_cf_opt(cf, event_key(&id, seq), &value, &wo)
            .expect("put");
    });
}

/// One event, written and fsync'd before the call returns.
mod append_fsync {
    use super::*;

    #[divan::bench(sample_count = 20, sample_size = 10)]
    fn troupe_journal(b: Bencher) {
        troupe_append(b, Durability::Fsync);
    }

    #[divan::bench(sample_count = 20, sample_size = 10)]
    fn raw_rocksdb_put(b: Bencher) {
        raw_put(b, Durability::Fsync);
    }
}

/// One event, written to RocksDB's log without waiting for the disk.
mod append_buffered {
    use super::*;

    #[divan::bench]
    fn troupe_journal(b: Bencher) {
        troupe_append(b, Durability::Buffered);
    }

    #[divan::bench]
    fn raw_rocksdb_put(b: Bencher) {
        raw_put(b, Durability::Buffered);
    }
}

/// 10,000 events of one id, read back in order.
mod replay {
    use super::*;

    /// A journal holding `REPLAYED` events of `id()`.
    fn filled() -> tempfile::TempDir {
        let rt = runtime();
        let dir = tempfile::tempdir().expect("dir");
        let journal =
            RocksJournal::open(RocksConfig::new(dir.path()).durability(Durability::Buffered))
                .expect("open");
        let id = id();
        rt.block_on(async {
            let mut seq = 0;
            while seq < REPLAYED {
                let n = (REPLAYED - seq).min(1_000);
                let events = (0..n).map(|_| event()).collect();
                seq = journal
                    .append(&id, seq, events)
                    .await
                    .expect("fill")
                    .last_seq;
            }
            journal.close().await;
        });
        dir
    }

    #[divan::bench(sample_count = 30)]
    fn troupe_journal(b: Bencher) {
        let dir = filled();
        let rt = runtime();
        let journal = RocksJournal::open_read_only(dir.path()).expect("open");
        let id = id();
        b.counter(REPLAYED).bench_local(|| {
            rt.block_on(async {
                let mut replay = journal.replay(&id, 1, u64::MAX);
                let mut count = 0u64;
                while let Some(batch) = replay.next().await {
                    count += batch.expect("batch").len() as u64;
                }
                assert_eq!(count, REPLAYED);
            })
        });
    }

    #[divan::bench(sample_count = 30)]
    fn raw_rocksdb_iterator(b: Bencher) {
        let dir = filled();
        let (opts, cfs) = RocksConfig::new(dir.path()).db_options();
        let db = DB::open_cf_descriptors_read_only(&opts, dir.path(), cfs, false).expect("open");
        let cf = db.cf_handle(CF_EVENTS).expect("events column family");
        let id = id();
        b.counter(REPLAYED).bench_local(|| {
            let mut ro = replay_read_options();
            ro.set_iterate_upper_bound(upper_bound(id.as_str()));
            let mut it = db.raw_iterator_cf_opt(cf, ro);
            it.seek(event_key(&id, 1));
            let mut count = 0u64;
            while let Some((_, v)) = it.item() {
                divan::black_box(v);
                count += 1;
                it.next();
            }
            it.status().expect("scan");
            assert_eq!(count, REPLAYED);
        });
    }
}
