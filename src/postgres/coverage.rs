//! Coverage: the publication must put every insert into the outbox table into the stream.
//! pgoutput leaves out, without a word, whatever its publication does not cover, and
//! keepalives then move the slot past it; an outbox outside the publication loses every event.
//!
//! [`verify`] reads through the catalog that the configured table — this very relation, by
//! its oid — is published for inserts (a partitioned table through its root, which needs
//! `publish_via_partition_root`), without a row filter, with every configured column. It reads
//! `pg_current_wal_lsn()` in a statement *before* the one whose snapshot it judges, so a DDL
//! that removed coverage and is not in that snapshot committed after the position read:
//! everything up to that position was decoded while the table was covered. A streaming session
//! repeats the verification every second ([`Gate::watch`]) and the pipeline never confirms past
//! the last verified position. A table dropped, recreated or removed from the publication, or a
//! configured column gone, ends in a definite error with the slot at or before that position,
//! which precedes the first event that could have been missed.
//!
//! One narrow window stays open: a DDL whose commit record is already written but which is not
//! yet visible (it waits for its WAL flush or a synchronous standby) at the moment the position
//! is read. Removing a table and putting it back between two verifications is caught through
//! the publication membership's own oid, which changes when it is added again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgwire_replication::Lsn;
use tokio_postgres::GenericClient;

use super::error::PgError;
use super::setup::{parse_lsn, pg, publication_missing, quote_ident, table_sql};
use crate::config::{Config, SourceMode};
use crate::error::{error_chain, Definite};

/// How often a streaming session verifies coverage again: confirmed positions trail the
/// server's WAL by about this much when the outbox is idle.
pub const VERIFY_EVERY: Duration = Duration::from_secs(1);

/// How long one verification may take before it counts as not done (transient).
const VERIFY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the catalog says about the outbox table and the publication, in one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finding {
    /// The table's oid, `None` when no relation has the configured name.
    pub relid: Option<u32>,
    /// A partitioned table (`relkind = 'p'`): its inserts land in partitions.
    pub partitioned: bool,
    /// The table's columns in order, with whether each is generated (pgoutput leaves those
    /// out of the stream).
    pub columns: Vec<(String, bool)>,
    /// `None` when no publication has the configured name.
    pub publication: Option<Publication>,
}

/// The configured publication as the catalog shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Publication {
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
    pub truncate: bool,
    pub via_root: bool,
    pub all_tables: bool,
    /// `pg_publication_tables` lists the table under its own name: its inserts arrive under
    /// that name (for a partitioned table only with `publish_via_partition_root`).
    pub listed: bool,
    /// The row filter the publication applies to the table (PostgreSQL 15+).
    pub row_filter: Option<String>,
    /// The table's columns the publication sends (PostgreSQL 15+; all of them without a
    /// column list).
    pub published_columns: Option<Vec<String>>,
    /// The oid of the `pg_publication_rel` row naming the table: a new one means the table
    /// was removed from the publication and added again.
    pub membership: Option<u32>,
}

/// A successful verification: what later ones are compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    /// The outbox table's oid.
    pub relid: u32,
    /// The publication's `pg_publication_rel` row for the table, if it names it directly.
    pub membership: Option<u32>,
    /// Every insert into the table committed at or before this WAL position is in the stream.
    pub lsn: u64,
}

/// The configured columns a Relation message of the outbox must carry: (config key, name).
/// The optional ones count when configured: a column the mapping names but the stream lacks
/// would silently publish no headers, or the wrong timestamp.
pub fn required_columns(cfg: &Config) -> Vec<(&'static str, &str)> {
    cfg.source
        .columns
        .configured(SourceMode::Logical)
        .map(|(spec, name)| (spec.key, name))
        .collect()
}

/// Reads the WAL position, then (in a later snapshot) the catalog.
pub async fn read(client: &impl GenericClient, cfg: &Config) -> Result<(u64, Finding), PgError> {
    // First, in a statement of its own: see the module docs.
    let lsn: String = client
        .query_one(
            // A standby (logical decoding on a standby, PostgreSQL 16+) has no insert
            // position; its catalog is as of the WAL it replayed.
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                         ELSE pg_current_wal_lsn() END::text",
            &[],
        )
        .await
        .map_err(pg("reading the current WAL position"))?
        .get(0);
    let lsn = parse_lsn(&lsn)?;
    let (schema, table) = cfg.source.table_parts();
    let row = client
        .query_one(
            "SELECT c.oid, c.relkind = 'p', \
                    ARRAY(SELECT a.attname::text FROM pg_attribute a \
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                          ORDER BY a.attnum), \
                    ARRAY(SELECT a.attgenerated <> '' FROM pg_attribute a \
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                          ORDER BY a.attnum), \
                    p.oid IS NOT NULL, coalesce(p.pubinsert, false), coalesce(p.pubupdate, false), \
                    coalesce(p.pubdelete, false), coalesce(p.pubtruncate, false), \
                    coalesce(p.pubviaroot, false), coalesce(p.puballtables, false), \
                    pt.listed IS NOT NULL, pt.rowfilter, pt.attnames, \
                    (SELECT r.oid FROM pg_publication_rel r \
                     WHERE r.prpubid = p.oid AND r.prrelid = c.oid) \
             FROM (SELECT to_regclass($1) AS oid) x \
             LEFT JOIN pg_class c ON c.oid = x.oid \
             LEFT JOIN pg_publication p ON p.pubname = $2 \
             LEFT JOIN LATERAL ( \
                 SELECT true AS listed, j ->> 'rowfilter' AS rowfilter, \
                        CASE WHEN jsonb_typeof(j -> 'attnames') = 'array' \
                             THEN ARRAY(SELECT jsonb_array_elements_text(j -> 'attnames')) END \
                             AS attnames \
                 FROM pg_publication_tables t, to_jsonb(t) j \
                 WHERE t.pubname = $2 AND t.schemaname = $3 AND t.tablename = $4 \
                 LIMIT 1) pt ON true",
            &[&table_sql(cfg), &cfg.source.publication, &schema, &table],
        )
        .await
        .map_err(pg("verifying that the publication covers the outbox table"))?;
    let relid: Option<u32> = row.get(0);
    let names: Vec<String> = row.get::<_, Option<Vec<String>>>(2).unwrap_or_default();
    let generated: Vec<bool> = row.get::<_, Option<Vec<bool>>>(3).unwrap_or_default();
    let publication = row.get::<_, bool>(4).then(|| Publication {
        insert: row.get(5),
        update: row.get(6),
        delete: row.get(7),
        truncate: row.get(8),
        via_root: row.get(9),
        all_tables: row.get(10),
        listed: row.get(11),
        row_filter: row.get(12),
        published_columns: row.get(13),
        membership: row.get(14),
    });
    Ok((
        lsn,
        Finding {
            relid,
            partitioned: row.get::<_, Option<bool>>(1).unwrap_or(false),
            columns: names.into_iter().zip(generated).collect(),
            publication,
        },
    ))
}

/// Verifies that the publication covers the outbox table with every configured column.
pub async fn verify(client: &impl GenericClient, cfg: &Config) -> Result<Coverage, PgError> {
    verify_since(client, cfg, None).await
}

/// [`verify`], and when `start` is given, that the table is still the relation verified then
/// and still in the publication through the same membership.
async fn verify_since(
    client: &impl GenericClient,
    cfg: &Config,
    start: Option<&Coverage>,
) -> Result<Coverage, PgError> {
    let (lsn, finding) = read(client, cfg).await?;
    if let (Some(start), Some(relid)) = (start, finding.relid) {
        // First: a recreated table is also missing from the publication, and this names why.
        if relid != start.relid {
            return Err(recreated(cfg, start.relid, relid));
        }
    }
    judge_table(&finding, cfg)?;
    judge_publication(&finding, cfg)?;
    let publication = finding.publication.unwrap_or_default();
    let now = Coverage {
        relid: finding.relid.unwrap_or_default(),
        membership: publication.membership,
        lsn,
    };
    if let Some(start) = start {
        compare(start, &now, cfg)?;
    }
    Ok(now)
}

/// The error for an outbox table dropped and created again under the same name.
pub(crate) fn recreated(cfg: &Config, was: u32, now: impl std::fmt::Display) -> PgError {
    Definite::TableRecreated {
        quoted: quote_ident(&cfg.source.publication),
        table: table_sql(cfg),
        was,
        now: now.to_string(),
    }
    .into()
}

/// The table exists and has every configured column, none of them generated.
pub fn judge_table(finding: &Finding, cfg: &Config) -> Result<(), PgError> {
    let table = table_sql(cfg);
    if finding.relid.is_none() {
        return Err(Definite::TableMissing { table }.into());
    }
    for (key, name) in required_columns(cfg) {
        let column = name.to_owned();
        match finding.columns.iter().find(|(column, _)| column == name) {
            None => return Err(Definite::ColumnMissing { table, column, key }.into()),
            Some((_, true)) => return Err(Definite::ColumnGenerated { table, column, key }.into()),
            Some(_) => {}
        }
    }
    Ok(())
}

/// The publication exists and delivers every insert into the table with every configured
/// column, under the table's own name.
pub fn judge_publication(finding: &Finding, cfg: &Config) -> Result<(), PgError> {
    let table = table_sql(cfg);
    let quoted = quote_ident(&cfg.source.publication);
    let name = cfg.source.publication.clone();
    let Some(publication) = &finding.publication else {
        return Err(publication_missing(cfg, false).into());
    };
    if !publication.insert {
        return Err(Definite::NoInserts {
            publication: name,
            quoted,
            publish: publish_with_insert(publication),
        }
        .into());
    }
    if finding.partitioned
        && !publication.via_root
        && (publication.listed || publication.all_tables || publication.membership.is_some())
    {
        // Listed or not: without the option, inserts arrive under the partitions' names.
        return Err(Definite::NotViaRoot {
            publication: name,
            quoted,
            table,
        }
        .into());
    }
    if !publication.listed {
        return Err(Definite::NotPublished {
            publication: name,
            quoted,
            table,
            needs_via_root: finding.partitioned && !publication.via_root,
        }
        .into());
    }
    if let Some(filter) = &publication.row_filter {
        return Err(Definite::RowFilter {
            publication: name,
            quoted,
            table,
            filter: filter.clone(),
        }
        .into());
    }
    if let Some(published) = &publication.published_columns {
        for (key, column) in required_columns(cfg) {
            if !published.iter().any(|p| p == column) {
                return Err(Definite::ColumnList {
                    publication: name,
                    quoted,
                    table,
                    column: column.to_owned(),
                    key,
                }
                .into());
            }
        }
    }
    Ok(())
}

/// The publication's `publish` option with `insert` added.
fn publish_with_insert(publication: &Publication) -> String {
    [
        ("insert", true),
        ("update", publication.update),
        ("delete", publication.delete),
        ("truncate", publication.truncate),
    ]
    .iter()
    .filter(|(_, on)| *on)
    .map(|(what, _)| *what)
    .collect::<Vec<_>>()
    .join(", ")
}

/// Compares a verification made while streaming with the one the session started from.
fn compare(start: &Coverage, now: &Coverage, cfg: &Config) -> Result<(), PgError> {
    if now.relid != start.relid {
        return Err(recreated(cfg, start.relid, now.relid));
    }
    if start.membership.is_some() && now.membership != start.membership {
        return Err(Definite::Readded {
            publication: cfg.source.publication.clone(),
            table: table_sql(cfg),
        }
        .into());
    }
    Ok(())
}

/// The highest verified position of a streaming session, kept current by [`Gate::watch`].
pub struct Gate {
    pool: deadpool_postgres::Pool,
    config: Arc<Config>,
    /// The session's verification at start.
    start: Coverage,
    verified: AtomicU64,
    /// The definite problem a verification found.
    lost: Mutex<Option<Definite>>,
    /// Postgres refuses new sessions because it is shutting down. A fast shutdown waits for
    /// the walsender's client to confirm the end of WAL, which cannot be verified any more:
    /// the session must leave the stream instead, and resume from the verified position.
    stopping: AtomicBool,
}

impl Gate {
    pub fn new(pool: deadpool_postgres::Pool, config: Arc<Config>, start: Coverage) -> Arc<Self> {
        Arc::new(Self {
            pool,
            config,
            start,
            verified: AtomicU64::new(start.lsn),
            lost: Mutex::new(None),
            stopping: AtomicBool::new(false),
        })
    }

    /// The verification the session started from.
    pub fn start(&self) -> Coverage {
        self.start
    }

    /// Positions up to here may be confirmed.
    pub fn verified(&self) -> u64 {
        self.verified.load(Ordering::Relaxed)
    }

    /// Why the session must end: the definite error a verification found once coverage is
    /// lost, or Postgres shutting down.
    pub fn lost(&self) -> Option<PgError> {
        let lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(definite) = lost.as_ref() {
            return Some(definite.clone().into());
        }
        self.stopping
            .load(Ordering::Relaxed)
            .then_some(PgError::ServerStopping)
    }

    /// Verifies every [`VERIFY_EVERY`] until coverage is lost (then it stops: the pipeline
    /// reports the error at its next tick).
    pub async fn watch(self: Arc<Self>) {
        loop {
            tokio::time::sleep(VERIFY_EVERY).await;
            if !self.refresh().await {
                return;
            }
        }
    }

    /// Verifies once and raises the verified position; false once coverage is lost. A
    /// verification that cannot be done (no connection, a timeout) changes nothing.
    pub async fn refresh(&self) -> bool {
        if self.lost().is_some() {
            return false;
        }
        if self.stopping.load(Ordering::Relaxed) {
            return false;
        }
        let result = tokio::time::timeout(VERIFY_TIMEOUT, async {
            let client = self.pool.get().await.map_err(PgError::pool)?;
            let result = verify_since(&**client, &self.config, Some(&self.start)).await;
            if matches!(result, Err(PgError::Postgres { .. })) {
                // A broken connection must not go back to the pool.
                let _ = deadpool_postgres::Object::take(client);
            }
            result
        })
        .await;
        let now = match result {
            Ok(Ok(now)) => Ok(now),
            Ok(Err(e)) if e.is_definite() => Err(e),
            Ok(Err(e)) if e.server_stopping() => {
                tracing::info!("postgres is shutting down: leaving the replication stream");
                self.stopping.store(true, Ordering::Relaxed);
                return false;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %error_chain(&e), "cannot verify the publication's coverage now");
                return true;
            }
            Err(_) => {
                tracing::debug!("verifying the publication's coverage timed out");
                return true;
            }
        };
        match now {
            Ok(now) => {
                self.verified.fetch_max(now.lsn, Ordering::Relaxed);
                true
            }
            Err(PgError::Definite(cause)) => {
                let lost = Definite::CoverageLost {
                    cause: Box::new(cause),
                    held: Lsn::from_u64(self.verified()).to_string(),
                };
                *self.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(lost);
                false
            }
            Err(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered() -> Finding {
        Finding {
            relid: Some(16386),
            partitioned: false,
            columns: [
                "id",
                "aggregate_type",
                "aggregate_id",
                "event_type",
                "payload",
                "headers",
                "created_at",
                "seq",
                "txid",
            ]
            .iter()
            .map(|c| ((*c).to_owned(), false))
            .collect(),
            publication: Some(Publication {
                insert: true,
                update: true,
                delete: true,
                truncate: true,
                via_root: true,
                all_tables: false,
                listed: true,
                row_filter: None,
                published_columns: None,
                membership: Some(16409),
            }),
        }
    }

    fn judge(finding: &Finding, cfg: &Config) -> Result<(), String> {
        judge_table(finding, cfg)
            .and_then(|()| judge_publication(finding, cfg))
            .map_err(|e| e.to_string())
    }

    fn publication(finding: &mut Finding) -> &mut Publication {
        finding.publication.as_mut().unwrap()
    }

    #[test]
    fn a_covered_table_passes() {
        let cfg = Config::default();
        assert_eq!(judge(&covered(), &cfg), Ok(()));
        let mut partitioned = covered();
        partitioned.partitioned = true;
        assert_eq!(judge(&partitioned, &cfg), Ok(()));
        let mut all_tables = covered();
        publication(&mut all_tables).all_tables = true;
        publication(&mut all_tables).membership = None;
        assert_eq!(judge(&all_tables, &cfg), Ok(()));
    }

    #[test]
    fn each_gap_names_its_fix() {
        let cfg = Config::default();
        type Change = Box<dyn Fn(&mut Finding)>;
        let cases: Vec<(&str, Change, &str)> = vec![
            ("no table", Box::new(|f| f.relid = None), "does not exist"),
            ("no publication", Box::new(|f| f.publication = None), "CREATE PUBLICATION \"outbox_relay\" FOR TABLE \"outbox\".\"events\" WITH (publish_via_partition_root = true)"),
            (
                "not listed",
                Box::new(|f| publication(f).listed = false),
                "ALTER PUBLICATION \"outbox_relay\" ADD TABLE \"outbox\".\"events\"",
            ),
            (
                "no inserts",
                Box::new(|f| {
                    publication(f).insert = false;
                    publication(f).delete = false;
                }),
                "SET (publish = 'insert, update, truncate')",
            ),
            (
                "partitioned without via root",
                Box::new(|f| {
                    f.partitioned = true;
                    publication(f).via_root = false;
                    publication(f).listed = false;
                }),
                "SET (publish_via_partition_root = true)",
            ),
            (
                "row filter",
                Box::new(|f| publication(f).row_filter = Some("(aggregate_type <> 'x')".into())),
                "DROP TABLE \"outbox\".\"events\"; ALTER PUBLICATION",
            ),
            (
                "column list",
                Box::new(|f| publication(f).published_columns = Some(vec!["id".into(), "payload".into()])),
                "\"aggregate_type\" (source.columns.aggregate_type)",
            ),
            (
                "missing column",
                Box::new(|f| f.columns.retain(|(c, _)| c != "payload")),
                "no column \"payload\" (source.columns.payload)",
            ),
            (
                "generated column",
                Box::new(|f| f.columns[4].1 = true),
                "generated",
            ),
        ];
        for (what, change, expected) in cases {
            let mut finding = covered();
            change(&mut finding);
            let error = judge(&finding, &cfg).expect_err(what);
            assert!(error.contains(expected), "{what}: {error}");
        }
    }

    #[test]
    fn unconfigured_optional_columns_may_be_absent() {
        let mut cfg = Config::default();
        cfg.source.columns.headers = None;
        cfg.source.columns.created_at = None;
        let mut finding = covered();
        finding
            .columns
            .retain(|(c, _)| c != "headers" && c != "created_at");
        assert_eq!(judge(&finding, &cfg), Ok(()));
        cfg.source.columns.headers = Some("headers".into());
        assert!(judge(&finding, &cfg).unwrap_err().contains("\"headers\""));
    }

    #[test]
    fn a_new_relation_or_membership_while_streaming_is_lost_coverage() {
        let cfg = Config::default();
        let start = Coverage {
            relid: 1,
            membership: Some(10),
            lsn: 100,
        };
        let later = Coverage { lsn: 200, ..start };
        assert!(compare(&start, &later, &cfg).is_ok());
        let recreated = Coverage { relid: 2, ..later };
        assert!(compare(&start, &recreated, &cfg)
            .unwrap_err()
            .to_string()
            .contains("dropped and created again"));
        let readded = Coverage {
            membership: Some(11),
            ..later
        };
        assert!(compare(&start, &readded, &cfg)
            .unwrap_err()
            .to_string()
            .contains("added again"));
        // Covered through FOR ALL TABLES (no membership row): nothing to compare.
        let all = Coverage {
            membership: None,
            ..start
        };
        assert!(compare(&all, &Coverage { lsn: 300, ..all }, &cfg).is_ok());
    }
}
