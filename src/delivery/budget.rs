//! The memory budget: the bytes that the messages being built and sent may hold at once.
//!
//! Memory is counted in bytes, not messages: one message with a hundred attachments can hold more
//! than a thousand without any. Before a message reads anything large it asks for its estimated
//! bytes (see `footprint.rs`), and it gives them back when its send is over.
//!
//! Waiting follows `limits.rs`: a message that cannot have its bytes now does not park a task or
//! hold a reconcile slot. It joins one queue, first come first served, and its reconcile ends;
//! when enough bytes are free the queue wakes its head through the controller's trigger channel,
//! and that message asks again. Nobody overtakes the head, so a large message is never starved by
//! a stream of small ones; a message larger than the whole budget is granted the whole budget,
//! once nothing else holds any, so it goes alone instead of waiting forever.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::limits::{WOKEN_GRACE, Wake};

/// The default budget: 512 MiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 512 * 1024 * 1024;

/// Bytes for the messages in flight, and who waits for them.
pub struct MemoryBudget<W> {
    inner: Arc<Inner<W>>,
}

struct Inner<W> {
    total: u64,
    state: Mutex<State<W>>,
    wake: Wake<W>,
    grace: Duration,
}

struct State<W> {
    /// Bytes granted and not yet given back.
    in_use: u64,
    /// Who waits, in order, with the bytes each asked for.
    waiting: VecDeque<(W, u64)>,
    /// Woken and not yet back: each keeps the bytes it was woken for, for a while.
    woken: HashMap<W, (u64, Instant)>,
}

/// A budget's state at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetFigures {
    /// The whole budget, in bytes.
    pub total: u64,
    /// Bytes granted, or kept for a woken message that has not taken them yet.
    pub held: u64,
    /// Messages waiting for their bytes.
    pub waiting: u64,
}

/// The answer to a request for bytes.
pub enum Grant<W: Clone + Eq + Hash> {
    /// Go on; the reservation holds the bytes until it is dropped.
    Go(Reservation<W>),
    /// Not now: the message is queued and will be woken.
    Wait,
}

/// Bytes granted to one message; dropping it gives them back and wakes who fits next.
pub struct Reservation<W: Clone + Eq + Hash> {
    inner: Arc<Inner<W>>,
    bytes: u64,
}

impl<W: Clone + Eq + Hash> Reservation<W> {
    /// The bytes it holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Gives back what is over `bytes` (a closer estimate, known once the message is built).
    /// Never grows: asking for more while holding some is how two messages deadlock.
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes >= self.bytes {
            return;
        }
        let mut s = self.inner.lock();
        s.in_use = s.in_use.saturating_sub(self.bytes - bytes);
        self.bytes = bytes;
        self.inner.wake_next(&mut s);
    }
}

impl<W: Clone + Eq + Hash> Drop for Reservation<W> {
    fn drop(&mut self) {
        let mut s = self.inner.lock();
        s.in_use = s.in_use.saturating_sub(self.bytes);
        self.inner.wake_next(&mut s);
    }
}

impl<W: Clone + Eq + Hash> MemoryBudget<W> {
    /// A budget of `total` bytes (at least one) that wakes waiting messages with `wake`.
    pub fn new(total: u64, wake: Wake<W>) -> Self {
        Self::with_grace(total, wake, WOKEN_GRACE)
    }

    /// A budget whose woken messages keep their bytes for `grace`.
    pub fn with_grace(total: u64, wake: Wake<W>, grace: Duration) -> Self {
        let state = State { in_use: 0, waiting: VecDeque::new(), woken: HashMap::new() };
        MemoryBudget { inner: Arc::new(Inner { total: total.max(1), state: Mutex::new(state), wake, grace }) }
    }

    /// The whole budget.
    pub fn total(&self) -> u64 {
        self.inner.total
    }

    /// Bytes granted now (woken messages' claims not counted).
    pub fn in_use(&self) -> u64 {
        self.inner.lock().in_use
    }

    /// What the budget holds now, for the metrics: the bytes granted or kept for woken messages,
    /// and how many messages wait in the queue.
    pub fn figures(&self) -> BudgetFigures {
        self.inner.figures()
    }

    /// Reads the figures later, for as long as the budget exists: the metrics hold this, and it
    /// does not keep the budget (nor its wake channel) alive.
    pub fn probe(&self) -> impl Fn() -> Option<BudgetFigures> + Send + Sync + 'static
    where
        W: Send + 'static,
    {
        let inner = Arc::downgrade(&self.inner);
        move || inner.upgrade().map(|inner| inner.figures())
    }

    /// `bytes` for `me`, now or later through the wake callback. More than the whole budget is
    /// granted as the whole budget. A message woken for its turn goes before everyone; one that
    /// did not wait goes only when nobody waits.
    pub fn try_reserve(&self, me: &W, bytes: u64) -> Grant<W> {
        let bytes = bytes.min(self.inner.total);
        let mut s = self.inner.lock();
        s.expire_woken(self.inner.grace);
        let woken = s.woken.remove(me).is_some();
        let queued_at = s.waiting.iter().position(|(w, _)| w == me);
        let others_first = !woken
            && match queued_at {
                Some(i) => i > 0,
                None => !s.waiting.is_empty(),
            };
        if !others_first && s.free(self.inner.total) >= bytes {
            if let Some(i) = queued_at {
                s.waiting.remove(i);
            }
            s.in_use += bytes;
            drop(s);
            return Grant::Go(Reservation { inner: Arc::clone(&self.inner), bytes });
        }
        match queued_at {
            Some(i) => s.waiting[i].1 = bytes,
            // A woken message that lost its turn (the bytes were not there after all) keeps its place.
            None if woken => s.waiting.push_front((me.clone(), bytes)),
            None => s.waiting.push_back((me.clone(), bytes)),
        }
        self.inner.wake_next(&mut s);
        Grant::Wait
    }

    /// Takes `me` out of the queue, and gives back the bytes it was woken for (it no longer
    /// needs a turn: deleted, or waiting for something else).
    pub fn withdraw(&self, me: &W) {
        let mut s = self.inner.lock();
        s.waiting.retain(|(w, _)| w != me);
        s.woken.remove(me);
        self.inner.wake_next(&mut s);
    }

    /// Whether `me` waits in the queue or was woken for bytes it has not taken yet.
    pub fn holds_place_for(&self, me: &W) -> bool {
        let mut s = self.inner.lock();
        s.expire_woken(self.inner.grace);
        s.woken.contains_key(me) || s.waiting.iter().any(|(w, _)| w == me)
    }

    /// Wakes the head when its bytes are free: the safety net for a woken message that never
    /// came back, whose claim has expired since.
    pub fn kick(&self) {
        let mut s = self.inner.lock();
        self.inner.wake_next(&mut s);
    }
}

impl<W: Clone + Eq + Hash> Inner<W> {
    fn lock(&self) -> MutexGuard<'_, State<W>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn figures(&self) -> BudgetFigures {
        let mut s = self.lock();
        s.expire_woken(self.grace);
        let held = self.total.saturating_sub(s.free(self.total));
        BudgetFigures { total: self.total, held, waiting: s.waiting.len() as u64 }
    }

    /// Wakes messages from the head of the queue for as long as the head's bytes are free.
    fn wake_next(&self, s: &mut State<W>) {
        s.expire_woken(self.grace);
        while let Some((_, bytes)) = s.waiting.front() {
            let bytes = *bytes;
            if s.free(self.total) < bytes {
                return;
            }
            let Some((w, _)) = s.waiting.pop_front() else {
                return;
            };
            if (self.wake)(&w) {
                s.woken.insert(w, (bytes, Instant::now()));
            }
        }
    }
}

impl<W: Clone + Eq + Hash> State<W> {
    /// Bytes neither granted nor kept for a woken message.
    fn free(&self, total: u64) -> u64 {
        let claimed: u64 = self.woken.values().map(|(b, _)| b).sum();
        total.saturating_sub(self.in_use).saturating_sub(claimed)
    }

    fn expire_woken(&mut self, grace: Duration) {
        self.woken.retain(|_, (_, at)| at.elapsed() < grace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Log = Arc<Mutex<Vec<&'static str>>>;

    /// A budget whose wake callback records who was woken; `gone` no longer exist.
    fn budget(total: u64, gone: &[&'static str], grace: Duration) -> (MemoryBudget<&'static str>, Log) {
        let woken: Log = Arc::default();
        let (log, gone) = (woken.clone(), gone.to_vec());
        let wake: Wake<&'static str> = Arc::new(move |w| {
            log.lock().unwrap().push(*w);
            !gone.contains(w)
        });
        (MemoryBudget::with_grace(total, wake, grace), woken)
    }

    fn ask(b: &MemoryBudget<&'static str>, me: &'static str, bytes: u64) -> Option<Reservation<&'static str>> {
        match b.try_reserve(&me, bytes) {
            Grant::Go(r) => Some(r),
            Grant::Wait => None,
        }
    }

    #[test]
    fn bytes_are_granted_while_they_last_and_given_back_on_drop() {
        let (b, woken) = budget(100, &[], WOKEN_GRACE);
        let a = ask(&b, "a", 60).expect("60 of 100");
        let c = ask(&b, "c", 40).expect("the other 40");
        assert_eq!(b.in_use(), 100);
        assert!(ask(&b, "d", 1).is_none(), "nothing left");
        drop(c);
        assert_eq!(b.in_use(), 60);
        assert_eq!(*woken.lock().unwrap(), vec!["d"], "the freed bytes wake who waits");
        let d = ask(&b, "d", 1).expect("woken, it goes");
        drop((a, d));
        assert_eq!(b.in_use(), 0);
    }

    #[test]
    fn the_figures_count_granted_and_woken_bytes_and_the_queue() {
        let (b, _) = budget(100, &[], Duration::from_secs(60));
        assert_eq!(b.figures(), BudgetFigures { total: 100, held: 0, waiting: 0 });
        let a = ask(&b, "a", 70).expect("room");
        assert!(ask(&b, "c", 50).is_none());
        assert!(ask(&b, "d", 20).is_none());
        assert_eq!(b.figures(), BudgetFigures { total: 100, held: 70, waiting: 2 });
        drop(a);
        // c is woken and keeps its 50 bytes until it comes back; d (20) is woken too.
        assert_eq!(b.figures(), BudgetFigures { total: 100, held: 70, waiting: 0 });
        let c = ask(&b, "c", 50).expect("its turn");
        assert_eq!(b.figures().held, 70, "taken, no longer counted twice");
        drop(c);
        b.withdraw(&"d");
        let probe = b.probe();
        assert_eq!(probe(), Some(BudgetFigures { total: 100, held: 0, waiting: 0 }));
        drop(b);
        assert_eq!(probe(), None, "the probe does not keep the budget alive");
    }

    #[test]
    fn a_message_larger_than_the_budget_goes_alone() {
        let (b, woken) = budget(100, &[], WOKEN_GRACE);
        let small = ask(&b, "small", 10).expect("room");
        assert!(ask(&b, "huge", 1_000).is_none(), "it waits for everything to be free");
        assert!(ask(&b, "later", 1).is_none(), "and nobody passes it meanwhile");
        drop(small);
        assert_eq!(*woken.lock().unwrap(), vec!["huge"]);
        let huge = ask(&b, "huge", 1_000).expect("the whole budget");
        assert_eq!((huge.bytes(), b.in_use()), (100, 100));
        drop(huge);
        assert_eq!(*woken.lock().unwrap(), vec!["huge", "later"]);
    }

    #[test]
    fn first_come_first_served_and_no_overtaking() {
        let (b, woken) = budget(100, &[], WOKEN_GRACE);
        let a = ask(&b, "a", 90).expect("room");
        assert!(ask(&b, "big", 50).is_none());
        // 10 bytes are free, but the small one must not pass the big one in front of it.
        assert!(ask(&b, "small", 5).is_none());
        drop(a);
        // Both fit now: woken in order, each keeping its bytes until it comes back.
        assert_eq!(*woken.lock().unwrap(), vec!["big", "small"]);
        assert!(ask(&b, "new", 60).is_none(), "the woken ones' bytes are theirs");
        let big = ask(&b, "big", 50).expect("woken");
        let small = ask(&b, "small", 5).expect("woken");
        assert_eq!(b.in_use(), 55);
        drop((big, small));
        assert!(ask(&b, "new", 60).is_some());
    }

    #[test]
    fn shrinking_gives_back_the_difference_and_never_grows() {
        let (b, woken) = budget(100, &[], WOKEN_GRACE);
        let mut a = ask(&b, "a", 100).expect("all of it");
        assert!(ask(&b, "c", 30).is_none());
        a.shrink_to(70);
        assert_eq!((a.bytes(), b.in_use()), (70, 70));
        assert_eq!(*woken.lock().unwrap(), vec!["c"]);
        a.shrink_to(90);
        assert_eq!(a.bytes(), 70, "a reservation never grows");
        drop(a);
        assert_eq!(b.in_use(), 0);
    }

    #[test]
    fn a_waiter_that_is_gone_is_skipped_and_one_that_never_comes_back_loses_its_claim() {
        let (b, woken) = budget(100, &["gone"], Duration::from_millis(50));
        let a = ask(&b, "a", 100).expect("all");
        for w in ["gone", "slow", "next"] {
            assert!(ask(&b, w, 60).is_none());
        }
        drop(a);
        // "gone" is skipped; "slow" is woken and keeps its 60 bytes; "next" does not fit beside it.
        assert_eq!(*woken.lock().unwrap(), vec!["gone", "slow"]);
        assert!(b.holds_place_for(&"slow") && b.holds_place_for(&"next") && !b.holds_place_for(&"gone"));
        std::thread::sleep(Duration::from_millis(60));
        b.kick();
        assert_eq!(*woken.lock().unwrap(), vec!["gone", "slow", "next"]);
        assert!(!b.holds_place_for(&"slow"), "its claim expired");
        // Coming back late, it queues again behind the one now woken.
        assert!(ask(&b, "slow", 60).is_none());
        assert!(ask(&b, "next", 60).is_some());
    }

    #[test]
    fn withdrawing_gives_up_the_place_and_the_claim() {
        let (b, woken) = budget(100, &[], WOKEN_GRACE);
        let a = ask(&b, "a", 100).expect("all");
        assert!(ask(&b, "w1", 80).is_none());
        assert!(ask(&b, "w2", 80).is_none());
        drop(a);
        assert_eq!(*woken.lock().unwrap(), vec!["w1"]);
        b.withdraw(&"w1");
        assert_eq!(*woken.lock().unwrap(), vec!["w1", "w2"], "w1's bytes went to the next in line");
        assert!(!b.holds_place_for(&"w1"));
    }

    #[tokio::test]
    async fn a_cancelled_send_gives_its_bytes_back() {
        let (b, woken) = budget(100, &[], WOKEN_GRACE);
        let r = ask(&b, "a", 100).expect("all");
        assert!(ask(&b, "w", 10).is_none());
        // The send holding the reservation is cancelled (its task aborted, as at shutdown).
        let task = tokio::spawn(async move {
            let _held = r;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        assert_eq!(b.in_use(), 100);
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(b.in_use(), 0);
        assert_eq!(*woken.lock().unwrap(), vec!["w"]);
    }

    #[test]
    fn asking_again_while_queued_keeps_the_place() {
        let (b, _) = budget(100, &[], WOKEN_GRACE);
        let a = ask(&b, "a", 100).expect("all");
        assert!(ask(&b, "first", 10).is_none());
        assert!(ask(&b, "second", 10).is_none());
        assert!(ask(&b, "first", 20).is_none(), "still first, now for 20");
        drop(a);
        let second = ask(&b, "second", 10).expect("woken");
        let first = ask(&b, "first", 20).expect("woken");
        assert_eq!((first.bytes(), second.bytes(), b.in_use()), (20, 10, 30));
    }
}
