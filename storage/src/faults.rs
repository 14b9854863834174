//! Fault injection at the storage seam: `Faulty<S>` wraps any store and, as its shared
//! `Faults` control says, fails commits for a while (an outage: transient errors, reads too),
//! refuses for good the commits that insert a chosen message or write a chosen queue (a
//! permanent error), delays commits, or loses the answer of a commit that did apply (the
//! ambiguous commit a dropped connection gives). With no fault set it only forwards, at the cost of one uncontended lock
//! per commit. Used by the writer's unit tests, the broker's fault tests and the model test.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::{
    MessageRow, MessageStore, MetaStore, Op, PermissionRecord, Plan, QueueSummary, Recovered,
    Snapshot, StoreError, StoredEntry, TopicPermissionRecord, UserRecord,
};

#[derive(Debug, Default)]
struct State {
    /// Every commit and read fails with a transient error while set.
    outage: bool,
    /// Commits inserting a message with this routing key are refused for good.
    reject_routing_key: Option<String>,
    /// Commits writing a queue of this name are refused for good.
    reject_queue: Option<String>,
    /// Commits putting a message in a queue of this name are refused for good (the queue is
    /// known by its id once a commit wrote its record).
    reject_positions_in: Option<String>,
    position_ids: Vec<i64>,
    /// The next this many commits apply, then report a transient failure.
    lose_answers: u32,
    /// Each commit first sleeps this long.
    delay: Duration,
    /// Each read first sleeps this long.
    read_delay: Duration,
    /// Commits attempted, faulty or not.
    commits: u64,
}

/// The control shared by a test and the `Faulty` store it wraps.
#[derive(Debug, Default)]
pub struct Faults {
    // Held only for short, non-awaiting sections.
    state: Mutex<State>,
}

impl Faults {
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts or ends an outage: every commit and read fails (transiently) meanwhile.
    pub fn set_outage(&self, on: bool) {
        self.lock().outage = on;
    }

    /// Refuses for good every commit that inserts a message with this routing key.
    pub fn reject_routing_key(&self, key: Option<&str>) {
        self.lock().reject_routing_key = key.map(str::to_string);
    }

    /// Refuses for good every commit that writes a queue of this name.
    pub fn reject_queue(&self, name: Option<&str>) {
        self.lock().reject_queue = name.map(str::to_string);
    }

    /// Refuses for good every commit that puts a message in the queue of this name (declared
    /// after this call), while its other commits go through.
    pub fn reject_positions_in(&self, name: Option<&str>) {
        let mut s = self.lock();
        s.reject_positions_in = name.map(str::to_string);
        s.position_ids.clear();
    }

    /// The next `n` commits are applied, then reported as failed (transiently).
    pub fn lose_answers(&self, n: u32) {
        self.lock().lose_answers = n;
    }

    /// Every commit first waits this long.
    pub fn set_delay(&self, d: Duration) {
        self.lock().delay = d;
    }

    /// Every read first waits this long (a slow store).
    pub fn set_read_delay(&self, d: Duration) {
        self.lock().read_delay = d;
    }

    /// Commits attempted so far.
    pub fn commits(&self) -> u64 {
        self.lock().commits
    }

    async fn check_read(&self) -> Result<(), StoreError> {
        let (outage, delay) = {
            let s = self.lock();
            (s.outage, s.read_delay)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if outage {
            return Err(StoreError::Unavailable("injected outage".to_string()));
        }
        Ok(())
    }
}

/// A store whose commits and reads go through `Faults`.
#[derive(Debug)]
pub struct Faulty<S> {
    inner: S,
    faults: Arc<Faults>,
}

impl<S> Faulty<S> {
    pub fn new(inner: S, faults: Arc<Faults>) -> Faulty<S> {
        Faulty { inner, faults }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }
}

/// What a commit does under the current faults.
enum Verdict {
    Apply,
    ApplyThenLose,
    Fail(StoreError),
}

impl<S: MessageStore> MessageStore for Faulty<S> {
    async fn apply(&self, plan: &Plan) -> Result<(), StoreError> {
        let (delay, verdict) = {
            let mut s = self.faults.lock();
            s.commits += 1;
            let rejected = s
                .reject_routing_key
                .as_deref()
                .is_some_and(|k| plan.inserts.iter().any(|i| i.message.routing_key == k))
                || s.reject_queue.as_deref().is_some_and(|n| {
                    plan.meta
                        .iter()
                        .any(|op| matches!(op, Op::PutQueue(q) if q.name == n))
                });
            if let Some(n) = s.reject_positions_in.clone() {
                for op in &plan.meta {
                    if let Op::PutQueue(q) = op {
                        if q.name == n {
                            s.position_ids.push(q.id);
                        }
                    }
                }
            }
            let rejected = rejected
                || plan.inserts.iter().any(|i| {
                    i.entries
                        .iter()
                        .any(|(queue, _)| s.position_ids.contains(queue))
                });
            let verdict = if s.outage {
                Verdict::Fail(StoreError::Unavailable("injected outage".to_string()))
            } else if rejected {
                Verdict::Fail(StoreError::Rejected("injected rejection".to_string()))
            } else if s.lose_answers > 0 {
                s.lose_answers -= 1;
                Verdict::ApplyThenLose
            } else {
                Verdict::Apply
            };
            (s.delay, verdict)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match verdict {
            Verdict::Apply => self.inner.apply(plan).await,
            Verdict::ApplyThenLose => {
                self.inner.apply(plan).await?;
                Err(StoreError::Unavailable(
                    "injected: connection lost after commit".to_string(),
                ))
            }
            Verdict::Fail(e) => Err(e),
        }
    }

    async fn recover(&self) -> Result<Recovered, StoreError> {
        self.faults.check_read().await?;
        self.inner.recover().await
    }

    async fn queue_summary(&self, queue_id: i64) -> Result<QueueSummary, StoreError> {
        self.faults.check_read().await?;
        self.inner.queue_summary(queue_id).await
    }

    async fn read_queue(
        &self,
        queue_id: i64,
        after_seq: i64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        self.faults.check_read().await?;
        self.inner
            .read_queue(queue_id, after_seq, limit, max_bytes)
            .await
    }

    async fn read_message(&self, id: i64) -> Result<Option<MessageRow>, StoreError> {
        self.faults.check_read().await?;
        self.inner.read_message(id).await
    }

    async fn queue_bytes(&self, queue_id: i64) -> Result<u64, StoreError> {
        self.faults.check_read().await?;
        self.inner.queue_bytes(queue_id).await
    }
}

impl<S: MetaStore> MetaStore for Faulty<S> {
    async fn load_meta(&self) -> Result<Snapshot, StoreError> {
        self.faults.check_read().await?;
        self.inner.load_meta().await
    }

    async fn has_users(&self) -> Result<bool, StoreError> {
        self.faults.check_read().await?;
        self.inner.has_users().await
    }

    async fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.faults.check_read().await?;
        self.inner.user(name).await
    }

    async fn permission(
        &self,
        vhost: &str,
        user: &str,
    ) -> Result<Option<PermissionRecord>, StoreError> {
        self.faults.check_read().await?;
        self.inner.permission(vhost, user).await
    }

    async fn topic_permissions(
        &self,
        vhost: &str,
        user: &str,
    ) -> Result<Vec<TopicPermissionRecord>, StoreError> {
        self.faults.check_read().await?;
        self.inner.topic_permissions(vhost, user).await
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.faults.check_read().await?;
        self.inner.list_users().await
    }

    async fn list_permissions(&self) -> Result<Vec<PermissionRecord>, StoreError> {
        self.faults.check_read().await?;
        self.inner.list_permissions().await
    }

    async fn list_topic_permissions(&self) -> Result<Vec<TopicPermissionRecord>, StoreError> {
        self.faults.check_read().await?;
        self.inner.list_topic_permissions().await
    }
}
