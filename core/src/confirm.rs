//! Publisher confirms that need not wait for the store. A persistent message that every
//! durable queue holding it has seen acknowledged is no longer the broker's to lose, so its
//! confirm may go out before its insert commits, as RabbitMQ's does; the insert and the
//! removal then usually cancel in one batch and are never written (`Plan`).
//!
//! `Pending` counts the holds on one published message: the publishing channel's own (while it
//! routes) and one per in-memory entry of a durable queue (`ConfirmHold`, released only by an
//! ack or a no-ack delivery). A copy the store alone holds (paged out, or held by a delayed
//! exchange) pins it: that confirm waits for the commit. A hold dropped without release (the
//! queue was deleted or purged, the message expired or was dead-lettered) keeps the count
//! above zero, so the confirm waits for the commit then too: every path that is not an ack
//! falls back to the store.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// The holds on one published message whose publisher waits for its confirm.
#[derive(Debug)]
pub struct Pending {
    holders: AtomicU32,
    pinned: AtomicBool,
    /// The publishing connection's: woken when the last hold goes.
    waker: Arc<Notify>,
}

impl Pending {
    /// A pending confirm with the publisher's routing hold (release it once routed).
    pub fn new(waker: Arc<Notify>) -> Arc<Pending> {
        Arc::new(Pending {
            holders: AtomicU32::new(1),
            pinned: AtomicBool::new(false),
            waker,
        })
    }

    fn hold(&self) {
        self.holders.fetch_add(1, Ordering::AcqRel);
    }

    /// One hold is gone; the last wakes the publisher.
    pub fn release(&self) {
        if self.holders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.waker.notify_one();
        }
    }

    /// A copy only the store holds: the confirm waits for the commit.
    pub fn pin(&self) {
        self.pinned.store(true, Ordering::Release);
    }

    /// Every hold was released and nothing pinned it: the confirm may go.
    pub fn done(&self) -> bool {
        !self.pinned.load(Ordering::Acquire) && self.holders.load(Ordering::Acquire) == 0
    }
}

/// An entry's hold on its message's pending confirm. A clone holds nothing: only the entry
/// itself releases, once.
#[derive(Debug, Default)]
pub struct ConfirmHold(Option<Arc<Pending>>);

impl ConfirmHold {
    pub fn new(p: &Arc<Pending>) -> ConfirmHold {
        p.hold();
        ConfirmHold(Some(p.clone()))
    }

    /// The message was acknowledged (or delivered with no-ack) here.
    pub fn release(&mut self) {
        if let Some(p) = self.0.take() {
            p.release();
        }
    }

    /// Moves the hold out (to release it once a delivery is recorded).
    pub fn take(&mut self) -> ConfirmHold {
        ConfirmHold(self.0.take())
    }
}

impl Clone for ConfirmHold {
    fn clone(&self) -> Self {
        ConfirmHold(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_once_every_hold_is_released_and_never_when_pinned() {
        let waker = Arc::new(Notify::new());
        let p = Pending::new(waker.clone());
        let mut a = ConfirmHold::new(&p);
        let mut b = ConfirmHold::new(&p);
        // A clone (an entry copied for a view) holds nothing and releases nothing.
        let mut c = a.clone();
        c.release();
        p.release(); // routed
        assert!(!p.done());
        a.release();
        a.release(); // twice is once
        assert!(!p.done());
        b.release();
        assert!(p.done());
        let p = Pending::new(waker);
        let mut a = ConfirmHold::new(&p);
        p.pin();
        p.release();
        a.release();
        assert!(
            !p.done(),
            "a store-only copy pins the confirm to the commit"
        );
        // A hold dropped unreleased (queue deleted) keeps it waiting for the commit.
        let p = Pending::new(Arc::new(Notify::new()));
        drop(ConfirmHold::new(&p));
        p.release();
        assert!(!p.done());
    }
}
