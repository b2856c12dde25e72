//! The inbox against a real Postgres (a throwaway cluster per test): applied once, duplicates
//! skipped without running the handler, a handler error rolls the inbox row back, a concurrent
//! duplicate on another connection applies once, purging, installing twice, and which errors
//! count as transient.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_inbox::{is_transient, Event, Inbox, Processed};
use testkit::{wait_until, ThrowawayPostgres};
use tokio_postgres::{Client, NoTls};

const ID: &str = "6f1c2a0e-5b7d-4c3a-8e9f-0123456789ab";

/// The consumer's own table: what its handler writes.
const EFFECTS: &str = "CREATE TABLE effects (event_id uuid NOT NULL, note text NOT NULL)";

async fn connect(pg: &ThrowawayPostgres) -> Client {
    let (client, connection) = tokio_postgres::connect(&pg.url("postgres"), NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

/// A cluster with the inbox installed and the effects table, and a connection to it.
async fn setup() -> (ThrowawayPostgres, Client) {
    let pg = ThrowawayPostgres::start().expect("postgres starts");
    let client = connect(&pg).await;
    Inbox::install(&client).await.expect("install");
    client.batch_execute(EFFECTS).await.expect("effects table");
    (pg, client)
}

fn event(id: &'static str) -> Event<'static> {
    Event::from_parts(
        Some(b"order-42"),
        Some(br#"{"total": 10}"#),
        [
            ("id", Some(id.as_bytes())),
            ("event_type", Some(&b"OrderPlaced"[..])),
            ("aggregate_type", Some(&b"order"[..])),
        ],
    )
    .expect("an event")
}

/// The handler every test uses: writes one effect row, counts its runs.
async fn apply(
    tx: &mut tokio_postgres::Transaction<'_>,
    runs: &AtomicUsize,
    note: &str,
) -> Result<&'static str, tokio_postgres::Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    tx.execute(
        "INSERT INTO effects (event_id, note) VALUES ($1::text::uuid, $2)",
        &[&ID, &note],
    )
    .await?;
    Ok("done")
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

#[tokio::test]
async fn an_event_is_applied_once_with_its_inbox_row() {
    let (_pg, mut client) = setup().await;
    let inbox = Inbox::new("billing");
    let runs = AtomicUsize::new(0);
    let result = inbox
        .process(&mut client, &event(ID), async |tx| {
            apply(tx, &runs, "first").await
        })
        .await
        .expect("processed");
    assert_eq!(result, Processed::Applied("done"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(count(&client, "SELECT count(*) FROM effects").await, 1);
    let row = client
        .query_one("SELECT consumer, event_id::text FROM inbox.received", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "billing");
    assert_eq!(row.get::<_, String>(1), ID);
}

#[tokio::test]
async fn a_duplicate_is_skipped_without_running_the_handler() {
    let (_pg, mut client) = setup().await;
    let inbox = Inbox::new("billing");
    let runs = AtomicUsize::new(0);
    for _ in 0..3 {
        inbox
            .process(&mut client, &event(ID), async |tx| {
                apply(tx, &runs, "x").await
            })
            .await
            .expect("processed");
    }
    let again = inbox
        .process(&mut client, &event(ID), async |tx| {
            apply(tx, &runs, "x").await
        })
        .await
        .expect("processed");
    assert_eq!(again, Processed::Duplicate);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(count(&client, "SELECT count(*) FROM effects").await, 1);

    // Another consumer keeps its own inbox in the same table.
    let other = Inbox::new("shipping")
        .process(&mut client, &event(ID), async |tx| {
            apply(tx, &runs, "y").await
        })
        .await
        .expect("processed");
    assert_eq!(other, Processed::Applied("done"));
    assert_eq!(
        count(&client, "SELECT count(*) FROM inbox.received").await,
        2
    );
}

/// A handler's own error type: Postgres errors, and a business rule that rejects the event.
#[derive(Debug)]
enum HandlerError {
    Db(tokio_postgres::Error),
    Rejected,
}

impl From<tokio_postgres::Error> for HandlerError {
    fn from(err: tokio_postgres::Error) -> Self {
        HandlerError::Db(err)
    }
}

#[tokio::test]
async fn a_handler_error_rolls_back_the_inbox_row_so_the_retry_is_accepted() {
    let (_pg, mut client) = setup().await;
    let inbox = Inbox::new("billing");
    let runs = AtomicUsize::new(0);

    // The handler wrote its effects and then refused: a clean transaction, rolled back all the same.
    let rejected = inbox
        .process(&mut client, &event(ID), async |tx| {
            apply(tx, &runs, "half done").await?;
            Err::<&str, _>(HandlerError::Rejected)
        })
        .await;
    assert!(
        matches!(rejected, Err(HandlerError::Rejected)),
        "{rejected:?}"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM inbox.received").await,
        0
    );
    assert_eq!(count(&client, "SELECT count(*) FROM effects").await, 0);

    // A statement of the handler failed.
    let failed = inbox
        .process(&mut client, &event(ID), async |tx| {
            apply(tx, &runs, "half done").await?;
            tx.execute("SELECT 1 / 0", &[]).await?;
            Ok::<_, HandlerError>("unreachable")
        })
        .await;
    let Err(HandlerError::Db(err)) = failed else {
        panic!("expected the statement's error, got {failed:?}");
    };
    assert!(
        !is_transient(&err),
        "division by zero is not transient: {err}"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM inbox.received").await,
        0
    );
    assert_eq!(count(&client, "SELECT count(*) FROM effects").await, 0);

    let retried = inbox
        .process(&mut client, &event(ID), async |tx| {
            apply(tx, &runs, "retry").await
        })
        .await
        .expect("retry");
    assert_eq!(retried, Processed::Applied("done"));
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!(count(&client, "SELECT count(*) FROM effects").await, 1);
    assert_eq!(
        count(&client, "SELECT count(*) FROM inbox.received").await,
        1
    );
}

#[tokio::test]
async fn inside_a_callers_transaction_it_is_a_savepoint() {
    let (_pg, mut client) = setup().await;
    let inbox = Inbox::new("billing");
    let runs = AtomicUsize::new(0);
    let mut outer = client.transaction().await.unwrap();
    let first = inbox
        .process(&mut outer, &event(ID), async |tx| {
            apply(tx, &runs, "a").await
        })
        .await
        .unwrap();
    let second = inbox
        .process(&mut outer, &event(ID), async |tx| {
            apply(tx, &runs, "b").await
        })
        .await
        .unwrap();
    assert_eq!(
        (first, second),
        (Processed::Applied("done"), Processed::Duplicate)
    );
    // Nothing is durable until the caller commits: rolling back the outer transaction forgets it.
    outer.rollback().await.unwrap();
    assert_eq!(
        count(&client, "SELECT count(*) FROM inbox.received").await,
        0
    );
    let after = inbox
        .process(&mut client, &event(ID), async |tx| {
            apply(tx, &runs, "c").await
        })
        .await
        .unwrap();
    assert_eq!(after, Processed::Applied("done"));
}

/// Consumer A has recorded the id and sits in its handler; consumer B (another connection)
/// processes the same id meanwhile. B must wait for A and then not apply (or apply when A
/// rolls back). Returns what B got and how many times the handlers ran in all.
async fn concurrent_duplicate(first_commits: bool) -> (Processed<&'static str>, usize, i64) {
    let (pg, mut a) = setup().await;
    let pg = Arc::new(pg);
    let mut b = connect(&pg).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();

    let a_runs = runs.clone();
    let first = tokio::spawn(async move {
        Inbox::new("billing")
            .process(&mut a, &event(ID), async |tx| {
                let done = apply(tx, &a_runs, "a").await;
                entered_tx.send(()).unwrap();
                release_rx.await.unwrap();
                if first_commits {
                    done
                } else {
                    tx.execute("SELECT 1 / 0", &[]).await?;
                    done
                }
            })
            .await
    });
    entered_rx.await.expect("A is inside its handler");

    let b_runs = runs.clone();
    let second = tokio::spawn(async move {
        Inbox::new("billing")
            .process(&mut b, &event(ID), async |tx| apply(tx, &b_runs, "b").await)
            .await
    });
    // B is blocked on A's inbox row before A may finish.
    let watcher = pg.clone();
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(30), "B waits on A's row lock", || {
            watcher
                .psql(
                    "postgres",
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE wait_event_type = 'Lock' AND query LIKE '%inbox.accept%'",
                )
                .map(|n| n.trim() == "1")
                .unwrap_or(false)
        })
    })
    .await
    .unwrap();
    release_tx.send(()).unwrap();

    let first = first.await.unwrap();
    assert_eq!(first.is_ok(), first_commits, "A: {first:?}");
    let second = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("B finishes once A is done")
        .unwrap()
        .expect("B processed");
    let check = connect(&pg).await;
    let effects = count(&check, "SELECT count(*) FROM effects").await;
    (second, runs.load(Ordering::SeqCst), effects)
}

#[tokio::test]
async fn a_concurrent_duplicate_waits_and_is_skipped_when_the_first_commits() {
    let (second, runs, effects) = concurrent_duplicate(true).await;
    assert_eq!(second, Processed::Duplicate);
    assert_eq!(runs, 1, "only A's handler ran");
    assert_eq!(effects, 1);
}

#[tokio::test]
async fn a_concurrent_duplicate_applies_when_the_first_rolls_back() {
    let (second, runs, effects) = concurrent_duplicate(false).await;
    assert_eq!(second, Processed::Applied("done"));
    assert_eq!(runs, 2, "A's handler ran and failed, then B's");
    assert_eq!(effects, 1, "only B's effect is left");
}

#[tokio::test]
async fn purge_deletes_only_this_consumers_old_rows() {
    let (_pg, client) = setup().await;
    client
        .batch_execute(
            "INSERT INTO inbox.received (consumer, event_id, received_at) VALUES \
             ('billing',  '00000000-0000-4000-8000-000000000001', now() - interval '8 days'), \
             ('billing',  '00000000-0000-4000-8000-000000000002', now() - interval '6 days'), \
             ('billing',  '00000000-0000-4000-8000-000000000003', now()), \
             ('shipping', '00000000-0000-4000-8000-000000000004', now() - interval '30 days')",
        )
        .await
        .unwrap();
    let seven_days = Duration::from_secs(7 * 24 * 3600);
    let deleted = Inbox::new("billing")
        .purge_older_than(&client, seven_days)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let left: Vec<String> = client
        .query(
            "SELECT right(event_id::text, 1) FROM inbox.received ORDER BY event_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["2", "3", "4"]);
}

#[tokio::test]
async fn install_is_idempotent_and_safe_from_two_connections_at_once() {
    let pg = ThrowawayPostgres::start().expect("postgres starts");
    let (a, b) = (connect(&pg).await, connect(&pg).await);
    let (ra, rb) = tokio::join!(Inbox::install(&a), Inbox::install(&b));
    ra.expect("install on A");
    rb.expect("install on B");
    Inbox::install(&a).await.expect("install again");
    // The SQL-only path works on what the helper installed.
    let accepted: Vec<bool> = a
        .query(
            "SELECT inbox.accept('sql', $1::text::uuid) FROM generate_series(1, 2)",
            &[&ID],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(accepted, [true, false]);
}

#[tokio::test]
async fn a_lost_connection_is_transient() {
    let (_pg, mut client) = setup().await;
    let killer = connect(&_pg).await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let runs = AtomicUsize::new(0);
    let err = Inbox::new("billing")
        .process(&mut client, &event(ID), async |tx| {
            apply(tx, &runs, "x").await?;
            killer
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await?;
            tx.execute("SELECT 1", &[]).await?;
            Ok::<_, tokio_postgres::Error>("unreachable")
        })
        .await
        .expect_err("the connection was cut");
    assert!(is_transient(&err), "{err:?}");
    assert_eq!(
        count(&killer, "SELECT count(*) FROM inbox.received").await,
        0
    );
}
