//! The journal conformance suite against PostgreSQL, each check in a
//! schema of its own. `make test` starts a throwaway server and sets
//! `TROUPE_PG_URL`; to run these alone:
//! `TROUPE_PG_URL=$(scripts/pg.sh start) cargo test -p troupe_postgres`.

use troupe_journal::PersistenceId;
use troupe_journal::tck::TckHarness;
use troupe_postgres::{PgConfig, PgJournal};

fn url() -> String {
    std::env::var("TROUPE_PG_URL").expect(
        "TROUPE_PG_URL is not set: `make test` starts a throwaway PostgreSQL; \
         by hand: TROUPE_PG_URL=$(scripts/pg.sh start) cargo test -p troupe_postgres",
    )
}

struct Pg {
    schema: String,
}

impl Pg {
    fn new() -> Self {
        Self {
            schema: format!("tck_{:016x}", rand::random::<u64>()),
        }
    }
}

#[async_trait::async_trait]
impl TckHarness for Pg {
    type Journal = PgJournal;
    async fn open(&mut self) -> PgJournal {
        let mut config = PgConfig::new(url()).schema(self.schema.clone());
        config.replay_batch_size = 64;
        config.pool_size = 4;
        PgJournal::open(config)
            .await
            .expect("open the PostgreSQL journal")
    }
    async fn close(&mut self, _journal: PgJournal) {}
    async fn overwrite_raw(&mut self, j: &PgJournal, id: &PersistenceId, seq: u64, bytes: &[u8]) {
        j.overwrite_raw(id, seq, bytes).await.expect("overwrite");
    }
    fn replay_batch_size(&self) -> usize {
        64
    }
}

troupe_journal::journal_tck!(Pg::new());

/// A bad schema name or connection string is a typed error, not a panic.
#[tokio::test]
async fn bad_configuration_is_a_clear_error() {
    let err = PgJournal::open(PgConfig::new(url()).schema("drop table; --"))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("schema"), "{err}");
    let err = PgJournal::open(PgConfig::new("postgres://nobody@127.0.0.1:1/none"))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("PostgreSQL"), "{err}");
}
