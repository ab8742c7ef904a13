//! `troupe journal ...` against a real journal in a temp dir.

use std::process::Command;

use troupe_journal::{Journal, NewEvent, PersistenceId, RocksConfig, RocksJournal};

fn troupe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_troupe"))
}

fn event(n: u64) -> NewEvent {
    NewEvent::raw("cli.Event", 1, rmp_serde::to_vec(&n).expect("encode")).expect("event")
}

/// Writes 3 ids x 20 events, then overwrites the given entries with garbage.
async fn journal_with_garbage(dir: &std::path::Path, garbage: &[(&str, u64)]) {
    let j = RocksJournal::open(RocksConfig::new(dir)).expect("open");
    for n in 0..3 {
        let id = PersistenceId::parse(&format!("cli/{n}")).expect("id");
        j.append(&id, 0, (1..=20).map(event).collect())
            .await
            .expect("append");
    }
    for (id, seq) in garbage {
        let id = PersistenceId::parse(id).expect("id");
        j.overwrite_raw(&id, *seq, b"\xde\xad\xbe\xef garbage")
            .expect("overwrite");
    }
    j.close().await;
}

#[tokio::test]
async fn verify_reports_exactly_the_garbage_entries_and_exits_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = [("cli/0", 3), ("cli/1", 20), ("cli/2", 1), ("cli/2", 11)];
    journal_with_garbage(dir.path(), &garbage).await;

    let out = troupe()
        .args(["journal", "--data-dir"])
        .arg(dir.path())
        .arg("verify")
        .output()
        .expect("run troupe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "verify must fail: {stdout}");
    let reported: Vec<String> = stdout
        .lines()
        .filter(|l| l.starts_with("BAD "))
        .map(|l| l.split(':').next().unwrap_or_default().to_owned())
        .collect();
    let want: Vec<String> = garbage
        .iter()
        .map(|(id, seq)| format!("BAD {id} #{seq}"))
        .collect();
    assert_eq!(reported, want, "{stdout}");
    assert!(
        stdout.contains("checked 60 events and 0 snapshots: 4 bad"),
        "{stdout}"
    );

    // The other entries still replay.
    let j = RocksJournal::open_read_only(dir.path()).expect("open");
    let id = PersistenceId::parse("cli/0").expect("id");
    let before = j.replay(&id, 1, 2).collect_all().await.expect("1-2");
    let after = j
        .replay(&id, 4, u64::MAX)
        .collect_all()
        .await
        .expect("4-20");
    assert_eq!(before.len() + after.len(), 19);
    assert_eq!(after.first().map(|e| e.seq), Some(4));
}

#[tokio::test]
async fn verify_passes_ls_lists_and_dump_prints_json_on_a_clean_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    journal_with_garbage(dir.path(), &[]).await;
    let run = |args: &[&str]| {
        troupe()
            .args(["journal", "--data-dir"])
            .arg(dir.path())
            .args(args)
            .output()
            .expect("run troupe")
    };
    let verify = run(&["verify"]);
    assert!(verify.status.success());
    assert!(
        String::from_utf8_lossy(&verify.stdout)
            .contains("checked 60 events and 0 snapshots: 0 bad")
    );

    let ls = String::from_utf8_lossy(&run(&["ls"]).stdout).into_owned();
    assert_eq!(
        ls.lines().collect::<Vec<_>>(),
        ["cli/0\t20", "cli/1\t20", "cli/2\t20"]
    );

    let dump = run(&["dump", "cli/1", "--from", "19"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&dump.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["seq"], 19);
    assert_eq!(lines[0]["payload"], 19);
    assert_eq!(lines[1]["type"], "cli.Event");
}

#[test]
fn a_missing_journal_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = troupe()
        .args(["journal", "--data-dir"])
        .arg(dir.path().join("nope"))
        .arg("ls")
        .output()
        .expect("run troupe");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no journal at"));
}

/// `archive` moves old events to the cold tier (an id with a corrupt
/// entry is archived up to it and listed, exit 1), `stats` counts each tier per
/// kind, and `dump` still prints archived events.
#[tokio::test]
async fn archive_moves_old_events_cold_and_stats_and_dump_see_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = dir.path().join("journal");
    journal_with_garbage(&journal, &[("cli/2", 5)]).await;
    // Events written just now: nothing is older than a day.
    let run = |args: &[&str]| {
        troupe()
            .args(["journal", "--data-dir"])
            .arg(&journal)
            .args(args)
            .output()
            .expect("run troupe")
    };
    let out = run(&["archive", "--older-than", "1d"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("archived 0 events"),
        "{out:?}"
    );
    let out = run(&["archive", "--older-than", "0s", "--zstd-level", "3"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "one id has a corrupt entry: {stdout}"
    );
    assert!(
        stdout.contains("archived 44 events of 3 ids (3 scanned)"),
        "{stdout}"
    );
    assert!(stdout.contains("NOT ARCHIVED cli/2"), "{stdout}");
    let out = run(&["stats"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let cli: Vec<&str> = stdout
        .lines()
        .find(|l| l.starts_with("cli "))
        .expect("a cli row")
        .split_whitespace()
        .collect();
    // kind, warm events, warm raw, warm disk, cold events, segments, ...
    assert_eq!((cli[1], cli[4]), ("16", "44"), "{stdout}");
    let out = run(&["dump", "cli/0"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 20);
    assert!(dir.path().join("cold/segments").is_dir());
}
