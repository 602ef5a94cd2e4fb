//! Per profile and sender mailbox: a token bucket (messages per minute), a concurrency limit, and
//! the queue of messages waiting for a turn.
//!
//! A message that cannot go now does not wait in a task of its own: it joins its mailbox's queue
//! and its reconcile ends. When a slot frees or the bucket refills, the mailbox wakes the message
//! at the head of the queue through a callback (the controller's trigger channel), and that
//! message asks again. A backlog of thousands of messages is then a queue of references, not
//! thousands of parked futures, and a slow profile never holds a reconcile slot that another
//! profile's message could use.
//!
//! A mailbox is created on first use and forgotten after [`IDLE_EXPIRY`] without use, with nobody
//! waiting and nothing in flight: a `*@domain` sender pattern admits any number of mailboxes, and
//! one that sent once must not be kept forever. Nothing is lost by forgetting it: its bucket
//! refills completely within a minute, so a mailbox made again later starts as the old one would.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Wakes a waiting message; false when it no longer exists or no longer waits, so that the next
/// one in line is woken instead.
pub type Wake<W> = Arc<dyn Fn(&W) -> bool + Send + Sync>;

/// How long a woken message keeps the slot it was woken for. One that does not ask again within
/// it (deleted meanwhile, or busy with something else) loses its claim on the slot.
pub const WOKEN_GRACE: Duration = Duration::from_secs(5);

/// How long a mailbox without use, waiters or sends in flight is kept. Longer than the minute in
/// which its bucket refills, so that forgetting it never lets a burst through early.
pub const IDLE_EXPIRY: Duration = Duration::from_secs(5 * 60);

/// (profile, mailbox), the mailbox in lower case.
type MailboxKey = (String, String);

/// Limits for every (profile, mailbox) pair, created on first use.
pub struct SendLimits<W> {
    mailboxes: Mutex<HashMap<MailboxKey, Arc<Mailbox<W>>>>,
    wake: Wake<W>,
    grace: Duration,
}

/// The limits of one mailbox and its queue.
struct Mailbox<W> {
    per_minute: u32,
    concurrent: u32,
    bucket: DefaultDirectRateLimiter,
    queue: Mutex<Queue<W>>,
    wake: Wake<W>,
    grace: Duration,
}

/// Who waits for a turn, in order.
struct Queue<W> {
    /// Sends in flight.
    in_use: u32,
    waiting: VecDeque<W>,
    members: HashSet<W>,
    /// Woken and not yet back, with when: each holds a free slot for a while, and goes before
    /// those still in the queue.
    woken: HashMap<W, Instant>,
    /// A timer wakes the head when the bucket refills.
    timer: bool,
    /// When a message last asked for a turn or released one.
    last_used: tokio::time::Instant,
    /// Taken out of the map (idle, or replaced by changed limits): whoever holds it asks the map again.
    retired: bool,
}

impl<W> Default for Queue<W> {
    fn default() -> Self {
        Queue {
            in_use: 0,
            waiting: VecDeque::new(),
            members: HashSet::new(),
            woken: HashMap::new(),
            timer: false,
            last_used: tokio::time::Instant::now(),
            retired: false,
        }
    }
}

/// The answer to a request for a turn.
pub enum Turn<W: Clone + Eq + Hash + Send + 'static> {
    /// Send now; the permit holds a concurrency slot until it is dropped.
    Go(SendPermit<W>),
    /// Not now: the message is queued and will be woken.
    Wait,
}

/// Held while a send is in flight; dropping it frees the slot and wakes the next message.
pub struct SendPermit<W: Clone + Eq + Hash + Send + 'static> {
    mailbox: Arc<Mailbox<W>>,
}

impl<W: Clone + Eq + Hash + Send + 'static> Drop for SendPermit<W> {
    fn drop(&mut self) {
        let mut q = self.mailbox.lock();
        q.in_use = q.in_use.saturating_sub(1);
        q.last_used = tokio::time::Instant::now();
        self.mailbox.wake_next(&mut q);
    }
}

impl<W: Clone + Eq + Hash + Send + 'static> SendLimits<W> {
    /// Limits that wake waiting messages with `wake`.
    pub fn new(wake: Wake<W>) -> Self {
        Self::with_grace(wake, WOKEN_GRACE)
    }

    /// Limits whose woken messages keep their slot for `grace`.
    pub fn with_grace(wake: Wake<W>, grace: Duration) -> Self {
        SendLimits { mailboxes: Mutex::new(HashMap::new()), wake, grace }
    }

    /// A turn for `me` on the mailbox: now, or later through the wake callback. A message that
    /// waited goes before one that did not. Changing a profile's limits takes effect for the
    /// next message; the queue carries over.
    pub fn try_acquire(&self, profile: &str, mailbox: &str, per_minute: u32, concurrent: u32, me: &W) -> Turn<W> {
        loop {
            let mb = self.mailbox(profile, mailbox, per_minute, concurrent);
            if let Some(turn) = Mailbox::try_acquire(mb, me) {
                return turn;
            }
        }
    }

    /// Wakes the head of every queue that has room: the safety net for a wake that went nowhere
    /// (its message was busy or gone), so that a queue never waits for a send that will not come.
    pub fn kick(&self) {
        let mailboxes: Vec<Arc<Mailbox<W>>> =
            self.mailboxes.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for mb in mailboxes {
            let mut q = mb.lock();
            mb.wake_next(&mut q);
        }
    }

    /// Whether `me` waits in a queue, or was woken for a turn it has not taken yet.
    pub fn holds_place_for(&self, me: &W) -> bool {
        let mailboxes: Vec<Arc<Mailbox<W>>> =
            self.mailboxes.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        mailboxes.iter().any(|mb| {
            let q = mb.lock();
            q.members.contains(me) || q.woken.contains_key(me)
        })
    }

    /// Forgets a profile's mailboxes (the profile was deleted). Messages in their queues are the
    /// caller's to wake.
    pub fn forget_profile(&self, profile: &str) {
        let mut map = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|(p, _), mb| {
            let keep = p != profile;
            if !keep {
                mb.lock().retired = true;
            }
            keep
        });
    }

    /// Forgets the mailboxes unused for `idle` with nobody waiting, nobody woken and nothing in
    /// flight; returns how many. Runs with the map locked, so no message can pick one up meanwhile
    /// (one that already holds it sees it retired and asks again).
    pub fn forget_idle(&self, idle: Duration) -> usize {
        let now = tokio::time::Instant::now();
        let mut map = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        let before = map.len();
        map.retain(|_, mb| {
            let mut q = mb.lock();
            let expired = q.is_idle(mb.grace) && now.saturating_duration_since(q.last_used) >= idle;
            if expired {
                q.retired = true;
            }
            !expired
        });
        before - map.len()
    }

    /// Mailboxes with limits and queues, for metrics.
    pub fn len(&self) -> usize {
        self.mailboxes.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn mailbox(&self, profile: &str, mailbox: &str, per_minute: u32, concurrent: u32) -> Arc<Mailbox<W>> {
        let mut map = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        let key = (profile.to_string(), mailbox.to_ascii_lowercase());
        let old = map.get(&key);
        if let Some(existing) = old
            && existing.per_minute == per_minute
            && existing.concurrent == concurrent
        {
            return Arc::clone(existing);
        }
        let queue = match old {
            Some(old) => {
                let mut q = old.lock();
                q.retired = true;
                Queue {
                    waiting: std::mem::take(&mut q.waiting),
                    members: std::mem::take(&mut q.members),
                    woken: std::mem::take(&mut q.woken),
                    ..Queue::default()
                }
            }
            None => Queue::default(),
        };
        let limit = Arc::new(Mailbox {
            per_minute,
            concurrent,
            bucket: RateLimiter::direct(quota(per_minute)),
            queue: Mutex::new(queue),
            wake: Arc::clone(&self.wake),
            grace: self.grace,
        });
        map.insert(key, Arc::clone(&limit));
        limit
    }
}

impl<W: Clone + Eq + Hash + Send + 'static> Mailbox<W> {
    fn lock(&self) -> MutexGuard<'_, Queue<W>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`SendLimits::try_acquire`] on this mailbox; `None` when it was retired after the map
    /// lookup (a queue nobody would wake), so the caller asks the map again.
    fn try_acquire(mb: Arc<Mailbox<W>>, me: &W) -> Option<Turn<W>> {
        let mut q = mb.lock();
        if q.retired {
            return None;
        }
        q.last_used = tokio::time::Instant::now();
        let woken = q.woken.remove(me).is_some();
        let others_first = !woken && q.waiting.front().is_some_and(|head| head != me);
        if q.has_room(mb.concurrent, mb.grace) && !others_first {
            match mb.bucket.check() {
                Ok(()) => {
                    q.dequeue(me);
                    q.in_use += 1;
                    mb.wake_next(&mut q);
                    drop(q);
                    return Some(Turn::Go(SendPermit { mailbox: mb }));
                }
                Err(not_until) => {
                    q.enqueue(me, woken);
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    Mailbox::arm_timer(&mb, &mut q, wait);
                    return Some(Turn::Wait);
                }
            }
        }
        q.enqueue(me, woken);
        // A slot may be free with others ahead (a woken message never came back): wake the head.
        mb.wake_next(&mut q);
        Some(Turn::Wait)
    }

    /// Wakes the first messages in line that still wait, one for each slot no woken message
    /// holds, unless the bucket is empty (then its timer wakes the head).
    fn wake_next(&self, q: &mut Queue<W>) {
        self.wake_up_to(q, usize::MAX);
    }

    /// Wakes at most `n` messages (see `wake_next`).
    fn wake_up_to(&self, q: &mut Queue<W>, mut n: usize) {
        while n > 0 && !q.timer && q.has_room(self.concurrent, self.grace) {
            let Some(w) = q.waiting.pop_front() else {
                return;
            };
            q.members.remove(&w);
            if (self.wake)(&w) {
                q.woken.insert(w, Instant::now());
                n -= 1;
            }
        }
    }

    /// Wakes the head once the bucket has refilled; one timer per mailbox at a time.
    fn arm_timer(mb: &Arc<Mailbox<W>>, q: &mut Queue<W>, wait: Duration) {
        if q.timer {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        q.timer = true;
        let mb = Arc::clone(mb);
        runtime.spawn(async move {
            tokio::time::sleep(wait).await;
            let mut q = mb.lock();
            q.timer = false;
            // The bucket holds one more message now.
            mb.wake_up_to(&mut q, 1);
        });
    }
}

impl<W: Clone + Eq + Hash> Queue<W> {
    /// Nobody waits, nobody woken holds a slot, nothing is in flight and no timer will fire.
    fn is_idle(&mut self, grace: Duration) -> bool {
        self.woken.retain(|_, at| at.elapsed() < grace);
        self.in_use == 0 && self.waiting.is_empty() && self.woken.is_empty() && !self.timer
    }

    /// Whether a slot is free that no recently woken message holds; forgets woken messages
    /// that did not come back in time.
    fn has_room(&mut self, concurrent: u32, grace: Duration) -> bool {
        self.woken.retain(|_, at| at.elapsed() < grace);
        (self.in_use as usize + self.woken.len()) < concurrent.max(1) as usize
    }

    /// Takes `me` out of the queue, if it is in it.
    fn dequeue(&mut self, me: &W) {
        if self.members.remove(me) {
            if self.waiting.front() == Some(me) {
                self.waiting.pop_front();
            } else {
                self.waiting.retain(|w| w != me);
            }
        }
    }

    /// Queues `me` once: at the front when it was woken for this turn and lost it.
    fn enqueue(&mut self, me: &W, woken: bool) {
        if self.members.insert(me.clone()) {
            if woken {
                self.waiting.push_front(me.clone());
            } else {
                self.waiting.push_back(me.clone());
            }
        }
    }
}

/// `per_minute` messages a minute, with a burst of at most that many (and at least one).
pub fn quota(per_minute: u32) -> Quota {
    let n = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Limits whose wake callback records who was woken; `gone` are waiters that no longer exist.
    fn limits(gone: &[&'static str]) -> (SendLimits<&'static str>, Arc<Mutex<Vec<&'static str>>>) {
        limits_with_grace(gone, WOKEN_GRACE)
    }

    fn limits_with_grace(
        gone: &[&'static str],
        grace: Duration,
    ) -> (SendLimits<&'static str>, Arc<Mutex<Vec<&'static str>>>) {
        let woken: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let (log, gone) = (woken.clone(), gone.to_vec());
        let wake: Wake<&'static str> = Arc::new(move |w| {
            log.lock().unwrap().push(*w);
            !gone.contains(w)
        });
        (SendLimits::with_grace(wake, grace), woken)
    }

    fn ask(
        l: &SendLimits<&'static str>,
        mailbox: &str,
        per_minute: u32,
        concurrent: u32,
        me: &'static str,
    ) -> Option<SendPermit<&'static str>> {
        match l.try_acquire("ns/p", mailbox, per_minute, concurrent, &me) {
            Turn::Go(p) => Some(p),
            Turn::Wait => None,
        }
    }

    #[test]
    fn concurrency_is_bounded_per_mailbox_and_a_freed_slot_wakes_the_first_in_line() {
        let (l, woken) = limits(&[]);
        let a = ask(&l, "a@contoso.com", 100_000, 2, "m1").expect("first slot");
        let _b = ask(&l, "a@contoso.com", 100_000, 2, "m2").expect("second slot");
        assert!(ask(&l, "a@contoso.com", 100_000, 2, "m3").is_none());
        assert!(ask(&l, "a@contoso.com", 100_000, 2, "m4").is_none());
        // Another mailbox of the same profile has its own slots.
        assert!(ask(&l, "b@contoso.com", 100_000, 2, "m9").is_some());
        // Asking again while waiting does not queue twice.
        assert!(ask(&l, "A@contoso.com", 100_000, 2, "m3").is_none());
        assert!(woken.lock().unwrap().is_empty());
        drop(a);
        assert_eq!(*woken.lock().unwrap(), vec!["m3"]);
        // A message that did not wait cannot take the slot the woken one is coming for...
        assert!(ask(&l, "a@contoso.com", 100_000, 2, "m5").is_none());
        // ...nor can the one behind it; the woken one can.
        assert!(ask(&l, "a@contoso.com", 100_000, 2, "m4").is_none());
        let c = ask(&l, "a@contoso.com", 100_000, 2, "m3").expect("the woken message goes");
        drop(c);
        assert_eq!(*woken.lock().unwrap(), vec!["m3", "m4"]);
        assert!(ask(&l, "a@contoso.com", 100_000, 2, "m4").is_some());
    }

    #[test]
    fn a_waiter_that_is_gone_is_skipped() {
        let (l, woken) = limits(&["m2"]);
        let a = ask(&l, "a@contoso.com", 100_000, 1, "m1").expect("slot");
        assert!(ask(&l, "a@contoso.com", 100_000, 1, "m2").is_none());
        assert!(ask(&l, "a@contoso.com", 100_000, 1, "m3").is_none());
        drop(a);
        assert_eq!(*woken.lock().unwrap(), vec!["m2", "m3"]);
        assert!(ask(&l, "a@contoso.com", 100_000, 1, "m3").is_some());
    }

    #[test]
    fn a_woken_message_that_does_not_come_back_loses_its_slot() {
        // A woken message may never ask again (deleted meanwhile); after the grace the slot is
        // the next one's, whose own recheck gets it.
        let (l, woken) = limits_with_grace(&[], Duration::from_millis(50));
        let a = ask(&l, "a@contoso.com", 100_000, 1, "m1").expect("slot");
        assert!(ask(&l, "a@contoso.com", 100_000, 1, "m2").is_none());
        assert!(ask(&l, "a@contoso.com", 100_000, 1, "m3").is_none());
        assert!(ask(&l, "a@contoso.com", 100_000, 1, "m4").is_none());
        drop(a);
        assert_eq!(*woken.lock().unwrap(), vec!["m2"]);
        assert!(ask(&l, "a@contoso.com", 100_000, 1, "m3").is_none(), "the slot is m2's for now");
        std::thread::sleep(Duration::from_millis(60));
        assert!(ask(&l, "a@contoso.com", 100_000, 1, "m4").is_none(), "m4 is behind m3");
        // m4's request found the slot free and woke m3, which now goes.
        assert_eq!(*woken.lock().unwrap(), vec!["m2", "m3"]);
        assert!(ask(&l, "a@contoso.com", 100_000, 1, "m3").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_bucket_queues_and_a_timer_wakes_the_head() {
        let (l, woken) = limits(&[]);
        // One a minute: the first goes at once, the second waits for the bucket.
        assert!(ask(&l, "a@contoso.com", 1, 4, "m1").is_some());
        assert!(ask(&l, "a@contoso.com", 1, 4, "m2").is_none());
        assert!(ask(&l, "a@contoso.com", 1, 4, "m3").is_none());
        assert!(woken.lock().unwrap().is_empty());
        // The timer sleeps until the bucket has a cell again (about a minute), then wakes m2 only.
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(*woken.lock().unwrap(), vec!["m2"]);
    }

    #[test]
    fn changed_limits_keep_the_queue() {
        let (l, woken) = limits(&[]);
        let a = ask(&l, "a@contoso.com", 100_000, 1, "m1").expect("slot");
        assert!(ask(&l, "a@contoso.com", 100_000, 1, "m2").is_none());
        // maxConcurrent raised: m2 is still first in line; the new slots wake it and m3 behind it.
        assert!(ask(&l, "a@contoso.com", 100_000, 3, "m3").is_none());
        assert_eq!(*woken.lock().unwrap(), vec!["m2", "m3"]);
        assert!(ask(&l, "a@contoso.com", 100_000, 3, "m2").is_some());
        assert!(ask(&l, "a@contoso.com", 100_000, 3, "m3").is_some());
        drop(a);
    }

    #[test]
    fn a_kick_wakes_the_head_once_the_woken_one_lost_its_claim() {
        let (l, woken) = limits_with_grace(&[], Duration::from_millis(50));
        let a = ask(&l, "a@contoso.com", 100_000, 1, "m1").expect("slot");
        assert!(ask(&l, "a@contoso.com", 100_000, 1, "m2").is_none());
        assert!(ask(&l, "a@contoso.com", 100_000, 1, "m3").is_none());
        drop(a);
        // m2 was woken and never came back.
        l.kick();
        assert_eq!(*woken.lock().unwrap(), vec!["m2"], "the slot is still m2's");
        std::thread::sleep(Duration::from_millis(60));
        l.kick();
        assert_eq!(*woken.lock().unwrap(), vec!["m2", "m3"]);
        l.kick();
        assert_eq!(*woken.lock().unwrap(), vec!["m2", "m3"], "nobody else waits");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_mailboxes_expire_and_busy_ones_stay() {
        let (l, woken) = limits(&[]);
        // Used once and released: idle from then on.
        drop(ask(&l, "a@noreply.contoso.com", 100_000, 1, "m1").expect("slot"));
        // A send in flight.
        let in_flight = ask(&l, "b@noreply.contoso.com", 100_000, 1, "m2").expect("slot");
        // One a minute: m3 goes, m4 waits for the bucket.
        drop(ask(&l, "c@noreply.contoso.com", 1, 1, "m3").expect("slot"));
        assert!(ask(&l, "c@noreply.contoso.com", 1, 1, "m4").is_none());
        assert_eq!(l.len(), 3);

        tokio::time::sleep(IDLE_EXPIRY - Duration::from_secs(1)).await;
        assert_eq!(l.forget_idle(IDLE_EXPIRY), 0, "not idle for long enough yet");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(l.forget_idle(IDLE_EXPIRY), 1, "only the idle one goes");
        assert_eq!(l.len(), 2);
        // m4 was woken when the bucket refilled and holds its slot: c is not idle.
        assert_eq!(*woken.lock().unwrap(), vec!["m4"]);

        // Releasing counts as use: b expires a whole IDLE_EXPIRY after its send ended.
        drop(in_flight);
        assert_eq!(l.forget_idle(IDLE_EXPIRY), 0);
        tokio::time::sleep(IDLE_EXPIRY).await;
        assert_eq!(l.forget_idle(IDLE_EXPIRY), 1);
        // A mailbox asked for again after it expired starts afresh.
        assert!(ask(&l, "a@noreply.contoso.com", 100_000, 1, "m5").is_some());
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn a_message_holding_a_retired_mailbox_asks_the_new_one() {
        let (l, _) = limits(&[]);
        let old = l.mailbox("ns/p", "a@contoso.com", 100_000, 1);
        l.forget_profile("ns/p");
        assert!(Mailbox::try_acquire(old, &"m1").is_none(), "a retired mailbox answers nothing");
        let _a = ask(&l, "a@contoso.com", 100_000, 1, "m1").expect("the new mailbox's slot");
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn forgetting_a_profile_drops_its_mailboxes() {
        let (l, _) = limits(&[]);
        let _a = ask(&l, "a@contoso.com", 100_000, 1, "m1").expect("slot");
        assert!(ask(&l, "a@contoso.com", 100_000, 1, "m2").is_none());
        l.forget_profile("ns/p");
        assert!(ask(&l, "a@contoso.com", 100_000, 1, "m3").is_some());
    }

    #[test]
    fn who_holds_a_place_is_known() {
        let (l, _) = limits(&[]);
        let first = ask(&l, "a@x", 1000, 1, "first").expect("a free slot");
        assert!(!l.holds_place_for(&"first"), "a message with a permit waits for nothing");
        assert!(ask(&l, "a@x", 1000, 1, "second").is_none());
        assert!(l.holds_place_for(&"second"), "queued");
        assert!(!l.holds_place_for(&"third"), "never asked");
        drop(first);
        assert!(l.holds_place_for(&"second"), "woken for the freed slot, not back yet");
        assert!(ask(&l, "a@x", 1000, 1, "second").is_some());
        assert!(!l.holds_place_for(&"second"));
    }
}
