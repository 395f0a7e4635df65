//! Sidecar sessions: one long-lived stream per sidecar. On connect the
//! sidecar is brought up to date (missed changes, or a snapshot), then every
//! committed change is pushed as it happens, with heartbeats in between;
//! acknowledgements are recorded durably as the proof of propagation.

use leash_api::revocation::RevocationKind;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use leash_api::v1::{
    ControlMessage, Heartbeat, Hello, RevocationEvent, Snapshot, control_message, sidecar_message,
};
use tokio::sync::{broadcast, mpsc};
use tonic::{Status, Streaming};

use crate::admin::types::{Acknowledgement, Propagation};
use crate::metrics::Metrics;
use crate::revocations::RevocationLog;
use crate::sidecar_api::routes_for;
use crate::state::ControlPlaneState;
use crate::store::{AckRecord, SessionRecord, Store, StoreError, now_ms};

/// A connected sidecar, as the admin API shows it.
pub struct SessionInfo {
    pub id: String,
    pub spiffe_id: Arc<str>,
    pub version: String,
    pub connected_at_ms: i64,
    pub last_heard_ms: AtomicI64,
    pub last_ack_seq: AtomicU64,
    pub last_ack_at_ms: AtomicI64,
}

/// The task that records acknowledgements in the store, in batches.
pub struct AckWriter {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl AckWriter {
    /// Stops taking acknowledgements and records those still queued; returns
    /// once they are written (or could not be), within `within`.
    pub async fn flush(mut self, within: std::time::Duration) {
        let _ = self.stop.send(());
        if tokio::time::timeout(within, &mut self.task).await.is_err() {
            tracing::warn!("acknowledgements still queued at shutdown were not recorded in time");
            self.task.abort();
        }
    }
}

/// Acknowledgements received and not yet written: at most one range per
/// session, so memory is bounded by the sessions and nothing is dropped
/// however far the store falls behind. A session's consecutive
/// acknowledgements merge into one range `(from, to]`, recorded with the
/// time of the newest: for the earlier sequences in it that time is an
/// upper bound (the proof never claims an acknowledgement earlier than it
/// came).
#[derive(Default)]
pub struct PendingAcks {
    state: std::sync::Mutex<PendingState>,
    wake: tokio::sync::Notify,
    /// Woken after each batch is written.
    written: tokio::sync::Notify,
}

#[derive(Default)]
struct PendingState {
    by_session: HashMap<String, Vec<AckRecord>>,
    closed: bool,
}

impl PendingAcks {
    /// Queues `a`; false once the writer has stopped taking them.
    pub fn push(&self, a: AckRecord) -> bool {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if st.closed {
            return false;
        }
        let ranges = st.by_session.entry(a.session_id.clone()).or_default();
        match ranges.last_mut() {
            Some(last) if last.to_seq == a.from_seq => {
                last.to_seq = a.to_seq;
                last.acked_at_ms = a.acked_at_ms;
            }
            _ => ranges.push(a),
        }
        drop(st);
        self.wake.notify_one();
        true
    }

    fn take(&self, close: bool) -> Vec<AckRecord> {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.closed |= close;
        st.by_session.drain().flat_map(|(_, v)| v).collect()
    }
}

/// Writes queued acknowledgements until told to stop, then writes what is
/// still queued: acknowledgements received are proof of propagation.
async fn write_acks(
    store: Store,
    pending: Arc<PendingAcks>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let write = async |batch: Vec<AckRecord>| {
        for chunk in batch.chunks(1024) {
            if let Err(e) = store.insert_acks(chunk).await {
                tracing::error!(error = %e, n = chunk.len(), "cannot record acknowledgements");
            }
        }
    };
    loop {
        tokio::select! {
            () = pending.wake.notified() => {
                let batch = pending.take(false);
                if !batch.is_empty() {
                    write(batch).await;
                    pending.written.notify_waiters();
                }
            }
            // Told to stop, or the control plane dropped without a shutdown.
            _ = &mut stop => break,
        }
    }
    write(pending.take(true)).await;
}

pub struct SessionRegistry {
    sessions: RwLock<HashMap<String, Arc<SessionInfo>>>,
    acks: Arc<PendingAcks>,
}

impl SessionRegistry {
    /// Woken each time acknowledgements received here are written.
    pub fn acks_written(&self) -> &tokio::sync::Notify {
        &self.acks.written
    }

    /// The registry and the task that writes acknowledgements in batches.
    pub fn new(store: Store) -> (Arc<Self>, AckWriter) {
        let acks = Arc::new(PendingAcks::default());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(write_acks(store, acks.clone(), stopped));
        (
            Arc::new(Self {
                sessions: RwLock::new(HashMap::new()),
                acks,
            }),
            AckWriter { stop, task },
        )
    }

    pub fn list(&self) -> Vec<Arc<SessionInfo>> {
        let mut v: Vec<_> = self
            .sessions
            .read()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| {
            a.connected_at_ms
                .cmp(&b.connected_at_ms)
                .then(a.id.cmp(&b.id))
        });
        v
    }

    pub fn len(&self) -> usize {
        self.sessions.read().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, info: Arc<SessionInfo>) {
        if let Ok(mut s) = self.sessions.write() {
            s.insert(info.id.clone(), info);
        }
    }

    fn remove(&self, id: &str) {
        if let Ok(mut s) = self.sessions.write() {
            s.remove(id);
        }
    }
}

/// Everything one session needs.
pub struct SessionDriver {
    pub state: Arc<ControlPlaneState>,
    pub registry: Arc<SessionRegistry>,
    pub metrics: Arc<Metrics>,
    pub heartbeat: Duration,
    /// Ends the session (the sidecar reconnects elsewhere or later).
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Longest string a sidecar may put in any report field.
pub const MAX_REPORT_FIELD: usize = 256;

/// A string from a sidecar, as it may be stored: bounded, printable.
fn printable(field: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_REPORT_FIELD {
        return Err(format!(
            "{field} is {} bytes (at most {MAX_REPORT_FIELD})",
            s.len()
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{field} holds control characters"));
    }
    Ok(())
}

/// The hello's strings are stored (sessions) and logged: bounded.
pub fn check_hello(h: &Hello) -> Result<(), String> {
    printable("sidecar_version", &h.sidecar_version)?;
    printable("store_id", &h.store_id)?;
    printable("instance_id", &h.instance_id)
}

fn msg(m: control_message::Msg) -> Result<ControlMessage, Status> {
    Ok(ControlMessage { msg: Some(m) })
}

/// The snapshot at `seq` cut into parts that each encode to less than
/// [`leash_api::SNAPSHOT_PART_BYTES`] (a single revocation is at most a few
/// KiB: its fields are bounded when it is created). Always at least one part.
pub fn snapshot_parts<'a>(
    store_id: &str,
    seq: u64,
    fingerprint_key: &[u8],
    active: impl Iterator<Item = &'a leash_api::v1::Revocation>,
) -> Vec<Snapshot> {
    use prost::Message as _;
    let part = || Snapshot {
        store_id: store_id.to_owned(),
        seq,
        active: Vec::new(),
        fingerprint_key: fingerprint_key.to_vec(),
        more: true,
    };
    let mut parts = vec![part()];
    let mut size = 0;
    for r in active {
        // Field tag and length prefix: a few bytes more than the message.
        let len = r.encoded_len() + 8;
        if size + len > leash_api::SNAPSHOT_PART_BYTES && size > 0 {
            parts.push(part());
            size = 0;
        }
        size += len;
        if let Some(last) = parts.last_mut() {
            last.active.push(r.clone());
        }
    }
    if let Some(last) = parts.last_mut() {
        last.more = false;
    }
    parts
}

impl SessionDriver {
    pub async fn run(
        self,
        spiffe_id: Arc<str>,
        hello: Hello,
        mut inbound: Streaming<leash_api::v1::SidecarMessage>,
        out: mpsc::Sender<Result<ControlMessage, Status>>,
    ) {
        let log: &RevocationLog = &self.state.revocations;
        let now = now_ms();
        let info = Arc::new(SessionInfo {
            id: uuid::Uuid::new_v4().to_string(),
            spiffe_id: spiffe_id.clone(),
            version: hello.sidecar_version.clone(),
            connected_at_ms: now,
            last_heard_ms: AtomicI64::new(now),
            last_ack_seq: AtomicU64::new(0),
            last_ack_at_ms: AtomicI64::new(0),
        });
        let store = log.store().clone();
        let record = SessionRecord {
            id: info.id.clone(),
            spiffe_id: spiffe_id.to_string(),
            version: info.version.clone(),
            connected_at_ms: now,
        };
        if let Err(e) = store.insert_session(&record, &self.state.replica.id).await {
            tracing::error!(error = %e, "cannot record session");
        }
        self.registry.insert(info.clone());
        tracing::info!(session = %info.id, workload = %spiffe_id, version = %info.version, resume_from = hello.last_applied_seq, resume_store = %hello.store_id, "sidecar session opened");

        let result = self.drive(&info, &hello, &mut inbound, &out).await;
        self.registry.remove(&info.id);
        if let Err(e) = store.end_session(&info.id, now_ms()).await {
            tracing::warn!(error = %e, "cannot record session end");
        }
        match result {
            Ok(()) => {
                tracing::info!(session = %info.id, workload = %spiffe_id, "sidecar session closed")
            }
            Err(reason) => {
                tracing::info!(session = %info.id, workload = %spiffe_id, %reason, "sidecar session ended")
            }
        }
    }

    async fn drive(
        &self,
        info: &SessionInfo,
        hello: &Hello,
        inbound: &mut Streaming<leash_api::v1::SidecarMessage>,
        out: &mpsc::Sender<Result<ControlMessage, Status>>,
    ) -> Result<(), String> {
        let log = &self.state.revocations;
        let send = |m| async move {
            out.send(msg(m))
                .await
                .map_err(|_| "sidecar went away".to_owned())
        };
        let sync_limit = crate::revocations::sync_limit(self.heartbeat);
        let unsynced = || async {
            let reason = "this replica cannot read the store; connect to another";
            let _ = out.send(Err(Status::unavailable(reason))).await;
            Err(reason.to_owned())
        };
        if !log.in_sync(sync_limit) {
            return unsynced().await;
        }
        // Subscribe before reading the snapshot so that nothing falls between.
        let mut changes = log.subscribe();
        let mut snapshot = log.snapshot();
        if hello.store_id == log.store_id && hello.last_applied_seq > snapshot.seq {
            // The sidecar comes from a replica further on: catch up first,
            // never send it a snapshot older than what it enforces.
            log.catch_up()
                .await
                .map_err(|e| format!("cannot read changes: {e}"))?;
            snapshot = log.snapshot();
        }
        // A sidecar with state from this store resumes; any other gets a snapshot.
        let mut unacked: VecDeque<(u64, Instant)> = VecDeque::new();
        let mut sent = if hello.store_id == log.store_id && hello.last_applied_seq <= snapshot.seq {
            // The sidecar states it enforces everything up to there: that is
            // an acknowledgement (and restores the proof if an earlier
            // session's record was lost with a crashed control plane).
            if hello.last_applied_seq > 0 {
                self.ack(
                    info,
                    hello.last_applied_seq,
                    hello.last_applied_seq,
                    &mut unacked,
                )?;
            }
            self.catch_up(hello.last_applied_seq, &send).await?
        } else {
            for part in snapshot_parts(
                &log.store_id,
                snapshot.seq,
                &log.fingerprint_key.0,
                snapshot.set.active(),
            ) {
                send(control_message::Msg::Snapshot(part)).await?;
            }
            snapshot.seq
        };
        let mut policy = self.state.policy_changed.subscribe();
        let routes = |s: &ControlPlaneState| {
            let p = s.policy.load();
            control_message::Msg::Routes(leash_api::v1::RouteSet {
                policy_version: p.version.clone(),
                routes: routes_for(&p.policy, &info.spiffe_id),
            })
        };
        send(routes(&self.state)).await?;

        // `unacked`: changes pushed and not yet acknowledged, for the propagation metric.
        let mut shutdown = self.shutdown.clone();
        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = leash_api::process::stopped(&mut shutdown) => return Ok(()),
                change = changes.recv() => match change {
                    Ok(c) if c.seq <= sent => {}
                    Ok(c) if c.seq == sent + 1 => {
                        send(control_message::Msg::Event(RevocationEvent {
                            seq: c.seq,
                            revocation: Some(c.revocation.clone()),
                            restored: c.restored,
                        }))
                        .await?;
                        sent = c.seq;
                        unacked.push_back((c.seq, c.committed_at));
                    }
                    // Lagged behind the broadcast, or a gap: replay from the store.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        sent = self.catch_up(sent, &send).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = heartbeat.tick() => {
                    // A heartbeat says nothing was missed: only said while
                    // this replica still reads the store.
                    if !log.in_sync(sync_limit) {
                        return unsynced().await;
                    }
                    send(control_message::Msg::Heartbeat(Heartbeat {
                        seq: sent,
                        sent_at_ms: now_ms(),
                        interval_ms: u64::try_from(self.heartbeat.as_millis()).unwrap_or(u64::MAX),
                    })).await?;
                }
                changed = policy.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    send(routes(&self.state)).await?;
                }
                message = inbound.message() => match message {
                    Ok(Some(m)) => {
                        info.last_heard_ms.store(now_ms(), Ordering::Relaxed);
                        match m.msg {
                            Some(sidecar_message::Msg::Ack(ack)) => self.ack(info, ack.seq, sent, &mut unacked)?,
                            // Reports are checked first (the guards count and
                            // log a refusal); refused ones fall to the arm below.
                            Some(sidecar_message::Msg::Leak(leak)) if self.well_formed(info, self.check_leak(&leak)) => {
                                self.leak_seen(info, leak).await;
                            }
                            Some(sidecar_message::Msg::Stripped(report)) if self.well_formed(info, self.check_upstream(&report.upstream)) => {
                                let store = self.state.revocations.store();
                                if let Err(e) = store.record_stripped(&info.spiffe_id, &report.upstream, report.count, now_ms()).await {
                                    tracing::warn!(error = %e, "cannot record stripped credentials");
                                }
                            }
                            Some(sidecar_message::Msg::Echoed(report)) if self.well_formed(info, self.check_upstream(&report.upstream).and_then(|()| check_header_name(&report.header))) => {
                                tracing::warn!(workload = %info.spiffe_id, upstream = %report.upstream, header = %report.header, count = report.count, "an upstream sent the injected credential back; the sidecar removed it");
                                let store = self.state.revocations.store();
                                if let Err(e) = store.record_echo(&info.spiffe_id, &report.upstream, &report.header, report.count, now_ms()).await {
                                    tracing::warn!(error = %e, "cannot record an echoed credential");
                                }
                            }
                            Some(sidecar_message::Msg::Usage(batch)) => {
                                if let Some(ack) = self.usage(info, hello, &batch).await {
                                    send(control_message::Msg::UsageAck(ack)).await?;
                                }
                            }
                            Some(sidecar_message::Msg::Leak(_) | sidecar_message::Msg::Stripped(_) | sidecar_message::Msg::Echoed(_)) => {}
                            Some(sidecar_message::Msg::Hello(_)) => return Err("second hello on one session".into()),
                            None => {}
                        }
                    }
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(status.message().to_owned()),
                },
            }
        }
    }

    /// Sends every change after `after` from the store; returns the last sequence sent.
    async fn catch_up<F, Fut>(&self, after: u64, send: &F) -> Result<u64, String>
    where
        F: Fn(control_message::Msg) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let events = self
            .state
            .revocations
            .store()
            .events_after(after)
            .await
            .map_err(|e| format!("cannot read changes: {e}"))?;
        let mut last = after;
        for (seq, stored, restored) in events {
            send(control_message::Msg::Event(RevocationEvent {
                seq,
                revocation: Some(stored.revocation),
                restored,
            }))
            .await?;
            last = seq;
        }
        Ok(last)
    }

    /// Stores a usage batch once. Acknowledged when stored (or already
    /// stored, or malformed: resending it would not help); not acknowledged
    /// when the store refuses the write, so the sidecar keeps it and sends
    /// it again later.
    async fn usage(
        &self,
        info: &SessionInfo,
        hello: &Hello,
        batch: &leash_api::v1::UsageBatch,
    ) -> Option<leash_api::v1::UsageAck> {
        let ack = leash_api::v1::UsageAck {
            batch_seq: batch.batch_seq,
        };
        if let Err(e) = crate::usage::validate(batch) {
            self.metrics
                .usage_rejected_batches
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(session = %info.id, workload = %info.spiffe_id, batch = batch.batch_seq, error = %e, "usage batch refused");
            return Some(ack);
        }
        // A sidecar without an instance id cannot be recognised across
        // sessions; its batches are at least unique within this one.
        let sidecar = if hello.instance_id.is_empty() {
            &info.id
        } else {
            &hello.instance_id
        };
        let store = self.state.revocations.store();
        match crate::usage::record(store, sidecar, &info.spiffe_id, batch).await {
            Ok(crate::usage::Recorded::New { requests }) => {
                self.metrics.usage_batches.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .usage_requests
                    .fetch_add(requests, Ordering::Relaxed);
                self.metrics
                    .usage_dropped_requests
                    .fetch_add(batch.dropped_requests, Ordering::Relaxed);
                if batch.dropped_requests > 0 {
                    tracing::warn!(workload = %info.spiffe_id, dropped_requests = batch.dropped_requests, "a sidecar dropped usage while the control plane was away");
                }
                Some(ack)
            }
            Ok(crate::usage::Recorded::Duplicate) => {
                self.metrics
                    .usage_duplicate_batches
                    .fetch_add(1, Ordering::Relaxed);
                Some(ack)
            }
            Err(e) => {
                tracing::error!(error = %e, workload = %info.spiffe_id, batch = batch.batch_seq, "cannot store usage; the sidecar keeps it and resends");
                None
            }
        }
    }

    /// Whether a report passed its checks; a failed one is counted and
    /// logged (bounded: the reason names fields, never their content).
    fn well_formed(&self, info: &SessionInfo, check: Result<(), String>) -> bool {
        match check {
            Ok(()) => true,
            Err(reason) => {
                self.metrics
                    .reports_rejected
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(session = %info.id, workload = %info.spiffe_id, %reason, "sidecar report refused");
                false
            }
        }
    }

    /// An upstream a report names: one the current policy has.
    fn check_upstream(&self, upstream: &str) -> Result<(), String> {
        printable("upstream", upstream)?;
        if self.state.policy.load().policy.upstream(upstream).is_none() {
            return Err("upstream is not one the policy names".into());
        }
        Ok(())
    }

    /// A leak refusal names an active leaked-value registration; its
    /// upstream is one of the policy's or empty (a host policy does not name).
    fn check_leak(&self, leak: &leash_api::v1::LeakRefusal) -> Result<(), String> {
        printable("revocation_id", &leak.revocation_id)?;
        printable("host", &leak.host)?;
        printable("location", &leak.location)?;
        if !leak.upstream.is_empty() {
            self.check_upstream(&leak.upstream)?;
        }
        let snapshot = self.state.revocations.snapshot();
        if snapshot
            .set
            .get(&leak.revocation_id)
            .is_none_or(|r| r.kind() != RevocationKind::Leaked)
        {
            return Err("revocation_id is not an active leaked-value registration".into());
        }
        Ok(())
    }

    /// A sidecar refused a leaked value: record who sent it, to what. The
    /// workload is the session's verified peer, not anything the sidecar says.
    async fn leak_seen(&self, info: &SessionInfo, leak: leash_api::v1::LeakRefusal) {
        tracing::warn!(
            revocation_id = %leak.revocation_id,
            workload = %info.spiffe_id,
            upstream = %leak.upstream,
            host = %leak.host,
            location = %leak.location,
            "leaked value refused"
        );
        let sighting = crate::store::Sighting {
            revocation_id: leak.revocation_id,
            workload: info.spiffe_id.to_string(),
            upstream: leak.upstream,
            host: leak.host,
            location: leak.location,
            count: 1,
            first_seen_ms: leak.at_ms,
            last_seen_ms: leak.at_ms,
        };
        match self
            .state
            .revocations
            .store()
            .record_sighting(&sighting)
            .await
        {
            Ok(true) => crate::ssf_out::SsfOut::seen(&self.state, &sighting),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "cannot record a leaked-value sighting"),
        }
    }

    fn ack(
        &self,
        info: &SessionInfo,
        seq: u64,
        sent: u64,
        unacked: &mut VecDeque<(u64, Instant)>,
    ) -> Result<(), String> {
        if seq > sent {
            return Err(format!("acknowledged {seq}, but only {sent} was sent"));
        }
        let previous = info.last_ack_seq.swap(seq, Ordering::AcqRel);
        let now = now_ms();
        info.last_ack_at_ms.store(now, Ordering::Relaxed);
        while let Some((s, committed)) = unacked.front() {
            if *s > seq {
                break;
            }
            self.metrics
                .revocation_propagation
                .observe(committed.elapsed());
            unacked.pop_front();
        }
        if seq > previous {
            let record = AckRecord {
                session_id: info.id.clone(),
                from_seq: previous,
                to_seq: seq,
                acked_at_ms: now,
            };
            if !self.registry.acks.push(record) {
                tracing::warn!(session = %info.id, seq, "acknowledgement after shutdown began; not recorded");
            }
        }
        Ok(())
    }
}

/// A response header name as a sidecar reports it.
fn check_header_name(name: &str) -> Result<(), String> {
    printable("header", name)?;
    if name.is_empty() || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err("header is not a header name".into());
    }
    Ok(())
}

/// Which sidecars have acknowledged `seq` (durable record) and which of the
/// connected ones, on any live replica, have not yet.
pub async fn propagation(cp: &ControlPlaneState, seq: u64) -> Result<Propagation, StoreError> {
    let store = &cp.store;
    let committed_at = store
        .revocations(false)
        .await?
        .into_iter()
        .find_map(|r| {
            if r.revoke_seq == seq {
                Some(r.revocation.revoked_at_ms)
            } else {
                r.restored.filter(|x| x.seq == seq).map(|x| x.at_ms)
            }
        })
        .unwrap_or(0);
    let acknowledged = store
        .acks_for(seq)
        .await?
        .into_iter()
        .map(|(session, at)| Acknowledgement {
            session_id: session.id,
            spiffe_id: session.spiffe_id,
            version: session.version,
            acked_at_ms: at,
            latency_ms: (at - committed_at).max(0),
        })
        .collect();
    let (connected, pending) = crate::replicas::pending(cp, seq).await?;
    Ok(Propagation {
        seq,
        connected,
        acknowledged,
        pending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_db::store_test;

    store_test!(
        async fn acknowledgements_still_queued_are_recorded_at_shutdown(db: &TestDb) {
            let store = db.open(None).await.unwrap();
            let sessions = 300;
            for n in 0..sessions {
                store
                    .insert_session(
                        &SessionRecord {
                            id: format!("s{n}"),
                            spiffe_id: "spiffe://leash.test/w".into(),
                            version: "test".into(),
                            connected_at_ms: 1,
                        },
                        "cp-test",
                    )
                    .await
                    .unwrap();
            }
            let (registry, writer) = SessionRegistry::new(store.clone());
            // Queued without yielding (one-thread runtime): the writer has not
            // written any of them when the flush starts. 30,000
            // acknowledgements, more than any fixed queue here ever held:
            // none is dropped, each session's merge into one range.
            let last = 100;
            for seq in 1..=last {
                for n in 0..sessions {
                    let ack = AckRecord {
                        session_id: format!("s{n}"),
                        from_seq: seq - 1,
                        to_seq: seq,
                        acked_at_ms: i64::try_from(seq).unwrap(),
                    };
                    assert!(registry.acks.push(ack));
                }
            }
            writer.flush(Duration::from_secs(60)).await;
            for seq in [1, last / 2, last] {
                let acked = store.acks_for(seq).await.unwrap();
                assert_eq!(acked.len(), sessions, "acks of {seq}");
                // The merged range carries its newest time: never earlier
                // than the acknowledgement of any sequence in it.
                assert!(
                    acked
                        .iter()
                        .all(|(_, at)| *at >= i64::try_from(seq).unwrap())
                );
            }
            // Nothing is taken after the flush.
            let late = AckRecord {
                session_id: "s1".into(),
                from_seq: last,
                to_seq: last + 1,
                acked_at_ms: 0,
            };
            assert!(!registry.acks.push(late));
            store.close().await;
        }
    );
}
