//! The journal suite: group-commit appends, replay and replay memory, each
//! against raw RocksDB doing the same work with the same options.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rocksdb::{DB, WriteBatch, WriteOptions};
use troupe_journal::rocks::keys::{CF_EVENTS, event_key, upper_bound};
use troupe_journal::{
    Durability, Journal, NewEvent, PersistenceId, RocksConfig, RocksJournal, replay_read_options,
};

use super::{Report, peak_rss_kib, rss_kib};

const PAYLOAD_BYTES: usize = 200;
const WRITERS: usize = 1000;
const REPLAY_ID: &str = "bench/replay-large";
const SMALL_ID: &str = "bench/replay-small";

struct Params {
    append_time: Duration,
    replay_large: u64,
    replay_small: u64,
}

type BoxError = Box<dyn std::error::Error>;

fn event() -> NewEvent {
    // 200 payload bytes, as an opaque blob.
    NewEvent::raw("bench.Event", 1, vec![0x5a; PAYLOAD_BYTES]).expect("bench event is valid")
}

fn envelope_len() -> usize {
    let mut buf = Vec::new();
    event().encode_envelope(&mut buf);
    buf.len()
}

fn note(msg: &str) {
    eprintln!("# {msg}");
}

pub fn run(quick: bool) -> Result<(), BoxError> {
    let p = if quick {
        Params {
            append_time: Duration::from_millis(1500),
            replay_large: 100_000,
            replay_small: 10_000,
        }
    } else {
        Params {
            append_time: Duration::from_secs(5),
            replay_large: 1_000_000,
            replay_small: 100_000,
        }
    };
    if quick {
        note(
            "quick mode: shorter append runs; replay figures use 100k (large) and 10k (small) events",
        );
    }
    let workers: usize = std::env::var("TROUPE_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    let report = Report;
    let base = tempfile::Builder::new().prefix("troupe-bench-").tempdir()?;
    note(&format!("data in {}", base.path().display()));

    for (durability, name) in [
        (Durability::Fsync, "journal_append_fsync"),
        (Durability::Buffered, "journal_append_buffered"),
    ] {
        let dir = base.path().join(name);
        let (rate, mean_batch) = rt.block_on(append_troupe(&dir, durability, p.append_time))?;
        let batch = mean_batch.round().max(1.0) as usize;
        note(&format!("{name}: mean group commit {mean_batch:.1} events"));
        let raw = raw_batches(
            &base.path().join(format!("{name}-raw")),
            durability,
            batch,
            p.append_time,
        )?;
        report.figure(name, rate, "events/s");
        report.figure(&format!("{name}_mean_batch"), mean_batch, "events");
        report.figure(
            &format!("raw_rocksdb_batch{batch}_{}", durability_word(durability)),
            raw,
            "events/s",
        );
        if durability == Durability::Buffered {
            // The baseline: raw puts without sync, one write each.
            let single = raw_batches(
                &base.path().join("raw-single"),
                durability,
                1,
                p.append_time,
            )?;
            report.figure("raw_rocksdb_single_put_buffered", single, "events/s");
            report.ratio(name, rate, single);
            // The stricter one: raw batches of the journal's own mean size.
            report.ratio("journal_append_buffered_vs_batches", rate, raw);
        } else {
            report.ratio(name, rate, raw);
        }
    }

    let dir = base.path().join("replay");
    rt.block_on(load_replay_data(&dir, &p))?;
    let mut best_troupe = 0f64;
    let mut best_raw = 0f64;
    for _ in 0..2 {
        best_troupe = best_troupe.max(rt.block_on(replay_troupe(&dir, p.replay_large))?);
        best_raw = best_raw.max(raw_scan(&dir, p.replay_large)?);
    }
    report.figure("journal_replay", best_troupe, "events/s");
    report.figure("raw_rocksdb_scan", best_raw, "keys/s");
    report.ratio("journal_replay", best_troupe, best_raw);

    let small = child_peak_rss(&dir, SMALL_ID)?;
    let large = child_peak_rss(&dir, REPLAY_ID)?;
    report.figure("journal_replay_peak_rss_100k", small, "MiB");
    report.figure("journal_replay_peak_rss_1m", large, "MiB");
    report.ratio("journal_replay_peak_rss_1m_vs_100k", large, small);
    Ok(())
}

fn durability_word(d: Durability) -> &'static str {
    match d {
        Durability::Fsync => "fsync",
        _ => "buffered",
    }
}

async fn append_troupe(
    dir: &Path,
    durability: Durability,
    time: Duration,
) -> Result<(f64, f64), BoxError> {
    let journal = RocksJournal::open(RocksConfig::new(dir).durability(durability))?;
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(WRITERS);
    for w in 0..WRITERS {
        let (journal, stop) = (journal.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let id = PersistenceId::parse(&format!("bench/w{w}")).expect("id");
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                journal.append(&id, seq, vec![event()]).await?;
                seq += 1;
            }
            Ok::<u64, troupe_journal::JournalError>(seq)
        }));
    }
    tokio::time::sleep(time).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let stats = journal.writer_stats();
    let mean_batch = stats.mean_batch();
    note(&format!(
        "{durability:?}: writer busy {:.0}% of the run, {:.0}% inside RocksDB write+sync; {} commits",
        100.0 * stats.busy().as_secs_f64() / elapsed,
        100.0 * stats.storage().as_secs_f64() / elapsed,
        stats.commits()
    ));
    journal.close().await;
    Ok((total as f64 / elapsed, mean_batch))
}

fn open_raw(dir: &Path) -> Result<DB, BoxError> {
    let (opts, cfs) = RocksConfig::new(dir).db_options();
    Ok(DB::open_cf_descriptors(&opts, dir, cfs)?)
}

/// Raw RocksDB: batches of `batch` puts of the journal's envelope size,
/// same keys and options, written back to back for `time`.
fn raw_batches(
    dir: &Path,
    durability: Durability,
    batch: usize,
    time: Duration,
) -> Result<f64, BoxError> {
    let db = open_raw(dir)?;
    let cf = db.cf_handle(CF_EVENTS).ok_or("no events column family")?;
    let mut wo = WriteOptions::default();
    wo.set_sync(durability == Durability::Fsync);
    let value = vec![0x5a; envelope_len()];
    let ids: Vec<PersistenceId> = (0..WRITERS)
        .map(|w| PersistenceId::parse(&format!("bench/w{w}")).expect("id"))
        .collect();
    let mut seqs = vec![0u64; WRITERS];
    let mut next = 0usize;
    let mut written = 0u64;
    let start = Instant::now();
    while start.elapsed() < time {
        let mut b = WriteBatch::default();
        for _ in 0..batch {
            let w = next % WRITERS;
            next += 1;
            seqs[w] += 1;
            b.put_cf(cf, event_key(&ids[w], seqs[w]), &value);
        }
        db.write_opt(b, &wo)?;
        written += batch as u64;
    }
    Ok(written as f64 / start.elapsed().as_secs_f64())
}

async fn load_replay_data(dir: &Path, p: &Params) -> Result<(), BoxError> {
    let journal = RocksJournal::open(RocksConfig::new(dir).durability(Durability::Buffered))?;
    for (id, count) in [(REPLAY_ID, p.replay_large), (SMALL_ID, p.replay_small)] {
        let id = PersistenceId::parse(id)?;
        let mut seq = 0;
        while seq < count {
            let n = (count - seq).min(1000);
            let events = (0..n).map(|_| event()).collect();
            journal.append(&id, seq, events).await?;
            seq += n;
        }
    }
    journal.close().await;
    Ok(())
}

async fn replay_troupe(dir: &Path, expect: u64) -> Result<f64, BoxError> {
    let journal = RocksJournal::open_read_only(dir)?;
    let id = PersistenceId::parse(REPLAY_ID)?;
    let start = Instant::now();
    let mut replay = journal.replay(&id, 1, u64::MAX);
    let mut count = 0u64;
    let mut bytes = 0usize;
    while let Some(batch) = replay.next().await {
        for ev in batch? {
            count += 1;
            bytes += ev.payload.len();
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if count != expect || bytes != expect as usize * PAYLOAD_BYTES {
        return Err(format!("replayed {count} events, expected {expect}").into());
    }
    Ok(count as f64 / elapsed)
}

fn raw_scan(dir: &Path, expect: u64) -> Result<f64, BoxError> {
    let (opts, cfs) = RocksConfig::new(dir).db_options();
    let db = DB::open_cf_descriptors_read_only(&opts, dir, cfs, false)?;
    let cf = db.cf_handle(CF_EVENTS).ok_or("no events column family")?;
    let id = PersistenceId::parse(REPLAY_ID)?;
    let start = Instant::now();
    let mut ro = replay_read_options();
    ro.set_iterate_upper_bound(upper_bound(id.as_str()));
    let mut it = db.raw_iterator_cf_opt(cf, ro);
    it.seek(event_key(&id, 1));
    let mut count = 0u64;
    let mut bytes = 0usize;
    while let Some((_, v)) = it.item() {
        count += 1;
        bytes += v.len();
        it.next();
    }
    it.status()?;
    let elapsed = start.elapsed().as_secs_f64();
    if count != expect || bytes == 0 {
        return Err(format!("scanned {count} keys, expected {expect}").into());
    }
    Ok(count as f64 / elapsed)
}

fn child_peak_rss(dir: &Path, id: &str) -> Result<f64, BoxError> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "replay-rss", "--data-dir"])
        .arg(dir)
        .args(["--id", id])
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "replay child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("peak_rss_kib: "))
        .ok_or("replay child printed no peak RSS")?
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

/// Runs in a child process so that its peak RSS is the replay's alone.
pub fn replay_rss_child(dir: &Path, id: &str) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let journal = RocksJournal::open_read_only(dir)?;
    let id = PersistenceId::parse(id)?;
    eprintln!(
        "# after open: peak_rss_kib {:?}, rss {:?}",
        peak_rss_kib(),
        rss_kib()
    );
    let count = rt.block_on(async {
        let mut replay = journal.replay(&id, 1, u64::MAX);
        let mut count = 0u64;
        while let Some(batch) = replay.next().await {
            count += batch?.len() as u64;
        }
        Ok::<_, BoxError>(count)
    })?;
    eprintln!("# after replay: rss {:?}", rss_kib());
    println!("events: {count}");
    println!(
        "peak_rss_kib: {}",
        peak_rss_kib().ok_or("no /proc/self/status")?
    );
    Ok(())
}
