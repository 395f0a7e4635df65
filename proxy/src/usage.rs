//! Usage accounting: what was forwarded, with which credential, to what.
//!
//! Every credential carries a [`UsageCell`]: fixed counters per (method,
//! status class), so recording a request costs a couple of relaxed atomic
//! operations on memory nobody else is writing, with no lock and no
//! allocation. Every `report_interval` the cells are drained into a numbered
//! [`UsageBatch`] that waits in a bounded buffer until the control plane
//! acknowledges it; batches are resent after a reconnect, and the control
//! plane ignores a batch it already stored. When the buffer overflows (the
//! control plane has been away for long), the oldest batches are dropped and
//! what they counted is carried in the next batch as `dropped_*`: usage is
//! delivered, or reported as dropped, never silently lost.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use leash_api::v1::{UsageBatch, UsageRecord};
use tokio::sync::Notify;

pub use leash_api::usage::{METHODS, STATUS_CLASSES as CLASSES};
const SLOTS: usize = METHODS.len() * CLASSES.len();
/// Marks a request whose usage is not counted (reporting off).
pub const NO_SLOT: usize = usize::MAX;

/// The counter slot of a method.
pub fn method_index(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::DELETE => 3,
        Method::PATCH => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// The slot of (method, answer); `None` is an upstream that did not answer.
pub fn slot(method: usize, status: Option<StatusCode>) -> usize {
    let class = status.map_or(5, |s| usize::from(s.as_u16() / 100).clamp(1, 5) - 1);
    method * CLASSES.len() + class
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[derive(Default)]
struct Slot {
    requests: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    first_ms: AtomicU64,
    last_ms: AtomicU64,
}

/// The counters of one credential.
pub struct UsageCell {
    credential_id: String,
    upstream: Arc<str>,
    kind: String,
    slots: [Slot; SLOTS],
}

impl UsageCell {
    /// One forwarded request: `at_ms` is when its credential was injected.
    #[inline]
    pub fn record(&self, slot: usize, at_ms: u64, bytes_sent: u64) {
        let s = &self.slots[slot];
        s.requests.fetch_add(1, Ordering::Relaxed);
        if bytes_sent > 0 {
            s.bytes_sent.fetch_add(bytes_sent, Ordering::Relaxed);
        }
        // Timestamps only: a race between two requests moves them by the
        // width of the race, never a count.
        if s.first_ms.load(Ordering::Relaxed) == 0 {
            s.first_ms.store(at_ms, Ordering::Relaxed);
        }
        s.last_ms.store(at_ms, Ordering::Relaxed);
    }

    /// Response body bytes streamed back to the workload.
    #[inline]
    pub fn received(&self, slot: usize, n: u64) {
        self.slots[slot]
            .bytes_received
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Moves the counts into records and returns how many requests they hold.
    fn drain(&self, out: &mut Vec<UsageRecord>) -> u64 {
        let mut total = 0;
        for (i, s) in self.slots.iter().enumerate() {
            let requests = s.requests.swap(0, Ordering::Relaxed);
            let bytes_received = s.bytes_received.swap(0, Ordering::Relaxed);
            if requests == 0 && bytes_received == 0 {
                continue;
            }
            let bytes_sent = s.bytes_sent.swap(0, Ordering::Relaxed);
            let first = s.first_ms.swap(0, Ordering::Relaxed);
            let last = s.last_ms.load(Ordering::Relaxed);
            total += requests;
            out.push(UsageRecord {
                credential_id: self.credential_id.clone(),
                upstream: self.upstream.to_string(),
                credential_kind: self.kind.clone(),
                method: leash_api::usage::wire(i / CLASSES.len()),
                status_class: leash_api::usage::wire(i % CLASSES.len()),
                requests,
                bytes_sent,
                bytes_received,
                first_seen_ms: i64::try_from(if first == 0 { last } else { first.min(last) })
                    .unwrap_or(i64::MAX),
                last_seen_ms: i64::try_from(last).unwrap_or(i64::MAX),
            });
        }
        total
    }
}

#[derive(Default)]
struct Buffer {
    pending: VecDeque<(UsageBatch, u64)>,
    records: usize,
    next_seq: u64,
    dropped_requests: u64,
    dropped_records: u64,
}

/// All cells, and the batches waiting for the control plane.
pub struct Usage {
    /// Names this process's batches (`Hello.instance_id`).
    pub instance_id: String,
    cells: Mutex<Vec<Arc<UsageCell>>>,
    buffer: Mutex<Buffer>,
    max_records: usize,
    /// Signalled when a batch is queued.
    pub queued: Notify,
    /// Signalled when a batch is acknowledged.
    pub acked: Notify,
    /// Totals since start, for `/metrics`.
    pub requests_reported: AtomicU64,
    pub requests_dropped: AtomicU64,
}

impl Usage {
    pub fn new(max_records: usize) -> Self {
        Self {
            instance_id: uuid::Uuid::new_v4().to_string(),
            cells: Mutex::new(Vec::new()),
            buffer: Mutex::new(Buffer {
                next_seq: 1,
                ..Buffer::default()
            }),
            max_records: max_records.max(1),
            queued: Notify::new(),
            acked: Notify::new(),
            requests_reported: AtomicU64::new(0),
            requests_dropped: AtomicU64::new(0),
        }
    }

    /// A new credential's counters, registered for collection.
    pub fn cell(&self, credential_id: &str, upstream: &Arc<str>, kind: &str) -> Arc<UsageCell> {
        let cell = Arc::new(UsageCell {
            credential_id: credential_id.to_owned(),
            upstream: upstream.clone(),
            kind: kind.to_owned(),
            slots: std::array::from_fn(|_| Slot::default()),
        });
        if let Ok(mut cells) = self.cells.lock() {
            cells.push(cell.clone());
        }
        cell
    }

    /// Drains every cell into a new batch (if there is anything to say) and
    /// queues it. Cells of credentials nobody holds any more are drained one
    /// last time and forgotten.
    pub fn collect(&self) {
        let mut records = Vec::new();
        let mut requests = 0;
        if let Ok(mut cells) = self.cells.lock() {
            cells.retain_mut(|cell| {
                // `get_mut` succeeds only when this is the last reference,
                // and synchronises with its other holders' last writes.
                let gone = Arc::get_mut(cell).is_some();
                requests += cell.drain(&mut records);
                !gone
            });
        }
        let Ok(mut buffer) = self.buffer.lock() else {
            return;
        };
        if records.is_empty() && buffer.dropped_requests == 0 && buffer.dropped_records == 0 {
            return;
        }
        let batch = UsageBatch {
            batch_seq: buffer.next_seq,
            dropped_requests: std::mem::take(&mut buffer.dropped_requests),
            dropped_records: std::mem::take(&mut buffer.dropped_records),
            created_at_ms: i64::try_from(now_ms()).unwrap_or(i64::MAX),
            records,
        };
        buffer.next_seq += 1;
        buffer.records += batch.records.len();
        buffer.pending.push_back((batch, requests));
        // Over the bound: the oldest go, and what they counted is carried
        // by the next batch.
        while buffer.records > self.max_records && buffer.pending.len() > 1 {
            let Some((old, n)) = buffer.pending.pop_front() else {
                break;
            };
            buffer.records -= old.records.len();
            buffer.dropped_requests += n + old.dropped_requests;
            buffer.dropped_records += old.records.len() as u64 + old.dropped_records;
            self.requests_dropped.fetch_add(n, Ordering::Relaxed);
            tracing::warn!(
                batch = old.batch_seq,
                requests = n,
                "usage buffer full: oldest batch dropped (reported as dropped)"
            );
        }
        drop(buffer);
        self.queued.notify_one();
    }

    /// Batches queued after `after`, to send.
    pub fn pending_after(&self, after: u64) -> Vec<UsageBatch> {
        self.buffer
            .lock()
            .map(|b| {
                b.pending
                    .iter()
                    .filter(|(batch, _)| batch.batch_seq > after)
                    .map(|(batch, _)| batch.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The control plane stored `batch_seq`.
    pub fn ack(&self, batch_seq: u64) {
        if let Ok(mut buffer) = self.buffer.lock()
            && let Some(i) = buffer
                .pending
                .iter()
                .position(|(b, _)| b.batch_seq == batch_seq)
            && let Some((batch, n)) = buffer.pending.remove(i)
        {
            buffer.records -= batch.records.len();
            self.requests_reported.fetch_add(n, Ordering::Relaxed);
        }
        self.acked.notify_waiters();
    }

    /// Batches not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.buffer.lock().map(|b| b.pending.len()).unwrap_or(0)
    }

    /// Collects what is left and waits (up to `timeout`) for the control
    /// plane to acknowledge everything. Returns whether it did.
    pub async fn flush(&self, timeout: std::time::Duration) -> bool {
        self.collect();
        let wait = async {
            loop {
                let acked = self.acked.notified();
                if self.pending() == 0 {
                    return;
                }
                acked.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(usage: &Usage, id: &str) -> Arc<UsageCell> {
        usage.cell(id, &Arc::from("api"), "jwt")
    }

    #[test]
    fn counts_move_into_one_batch_per_collection() {
        let usage = Usage::new(100);
        let c = cell(&usage, "c1");
        c.record(
            slot(method_index(&Method::GET), Some(StatusCode::OK)),
            10,
            0,
        );
        c.record(
            slot(method_index(&Method::GET), Some(StatusCode::OK)),
            20,
            0,
        );
        c.record(slot(method_index(&Method::POST), None), 30, 7);
        usage.collect();
        let batches = usage.pending_after(0);
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        assert_eq!(b.batch_seq, 1);
        let get = b
            .records
            .iter()
            .find(|r| r.method() == leash_api::v1::Method::Get)
            .unwrap();
        assert_eq!(
            (
                get.requests,
                leash_api::usage::status_class_name(get.status_class).unwrap(),
                get.first_seen_ms,
                get.last_seen_ms
            ),
            (2, "2xx", 10, 20)
        );
        let post = b
            .records
            .iter()
            .find(|r| r.method() == leash_api::v1::Method::Post)
            .unwrap();
        assert_eq!(
            (
                post.requests,
                leash_api::usage::status_class_name(post.status_class).unwrap(),
                post.bytes_sent
            ),
            (1, "error", 7)
        );
        // Nothing new: no empty batch.
        usage.collect();
        assert_eq!(usage.pending(), 1);
        usage.ack(1);
        assert_eq!(usage.pending(), 0);
        assert_eq!(usage.requests_reported.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn overflow_drops_oldest_and_carries_the_count() {
        let usage = Usage::new(2);
        let c = cell(&usage, "c1");
        for round in 0..4u64 {
            // Two records per batch: GET and PUT.
            for _ in 0..=round {
                c.record(slot(0, Some(StatusCode::OK)), 1, 0);
            }
            c.record(slot(2, Some(StatusCode::OK)), 1, 0);
            usage.collect();
        }
        // Only the newest batch fits; the three before it were dropped.
        // What a batch carried when it was dropped is carried again, and
        // the drops after the newest batch are carried by the next one.
        let pending = usage.pending_after(0);
        assert_eq!(pending.len(), 1);
        usage.collect();
        let pending = usage.pending_after(0);
        let dropped: u64 = pending.iter().map(|b| b.dropped_requests).sum();
        let kept: u64 = pending
            .iter()
            .flat_map(|b| &b.records)
            .map(|r| r.requests)
            .sum();
        let sent = (1 + 2 + 3 + 4) + 4;
        assert_eq!(kept + dropped, sent);
        assert!(dropped > 0);
    }

    #[test]
    fn a_dropped_credential_is_drained_then_forgotten() {
        let usage = Usage::new(100);
        let c = cell(&usage, "c1");
        c.record(0, 5, 0);
        drop(c);
        usage.collect();
        assert_eq!(usage.pending_after(0)[0].records[0].requests, 1);
        assert!(usage.cells.lock().unwrap().is_empty());
    }
}
