//! Micro-batching that adapts to load: a frame waits for the model, not for a batch window.
//!
//! [`BatchPolicy`] is the decision alone, a pure state machine: when the inference stage is
//! free it dispatches whatever frames are ready (Triton's dynamic batcher with a queue delay
//! of 0), so at light load a frame is inferred alone as soon as it is decoded, and under load
//! frames accumulate while the model runs and batches grow by themselves. An optional fill wait
//! holds a partial batch for more frames, and an optional latency target steers the batch limit
//! with AIMD (Clipper, NSDI'17). [`BatchQueue`] is the hand-off between the intake thread, which
//! decodes frames into the batch being built, and the inference thread, which takes it when the
//! policy says so.
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// What a prediction needs to know about its frame.
#[derive(Debug, Clone)]
pub struct FrameMeta {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub seq: Option<u64>,
    pub truth: Option<String>,
    /// Record timestamp (capture/produce time), ms since the epoch.
    pub ts_produce_ms: Option<i64>,
    /// Record timestamp -> polled, and decoding (see [`crate::metrics::FrameTimes`]).
    pub fetch_us: u64,
    pub decode_us: u64,
    /// When the frame, decoded, joined the batch being built (for the queueing time).
    pub queued_at: Instant,
    /// The record as read (value and headers), for a dead letter should the model or the
    /// producer reject the frame after it decoded.
    pub value: Vec<u8>,
    pub headers: Option<rdkafka::message::OwnedHeaders>,
}

/// Preprocessed frames laid out back to back, ready for the model.
#[derive(Debug, Default)]
pub struct Batch {
    pub input: Vec<f32>,
    pub frames: Vec<FrameMeta>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.frames.len()
    }
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// What the inference stage, when free, does with the frames that are ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing is ready.
    Idle,
    /// Take every ready frame now.
    Dispatch,
    /// Hold the partial batch this much longer for more frames (the optional fill wait).
    Wait(Duration),
}

/// Under a latency target, a batch whose oldest frame took below this share of the target
/// counts as slack: only then may the limit grow, so it settles inside the band instead of
/// crossing the target every few batches.
const SLACK: f64 = 0.8;
/// Multiplicative decrease on a breach.
const BACKOFF: f64 = 0.75;

/// The batching policy: a pure state machine, with time passed in, so it is tested without a
/// broker or a clock.
#[derive(Debug, Clone)]
pub struct BatchPolicy {
    max_size: usize,
    fill_wait: Duration,
    target: Option<Duration>,
    limit: usize,
}

impl BatchPolicy {
    /// `max_size`: the largest batch. `fill_wait`: how long a partial batch may wait for more
    /// frames (zero: never). `target`: a latency objective for a frame inside the worker
    /// (queueing + service); with one, the limit starts at 1 and is steered by [`observe`](Self::observe).
    pub fn new(max_size: usize, fill_wait: Duration, target: Option<Duration>) -> Self {
        let max_size = max_size.max(1);
        let limit = if target.is_some() { 1 } else { max_size };
        BatchPolicy { max_size, fill_wait, target, limit }
    }

    /// The batch limit now: `max_size` without a target, the controller's choice with one.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Called when the inference stage is free: `ready` frames wait, the oldest for `oldest_waited`.
    pub fn decide(&self, ready: usize, oldest_waited: Duration) -> Decision {
        if ready == 0 {
            Decision::Idle
        } else if ready >= self.limit || oldest_waited >= self.fill_wait {
            Decision::Dispatch
        } else {
            Decision::Wait(self.fill_wait - oldest_waited)
        }
    }

    /// After a batch of `size` frames whose oldest frame queued for `queued` and was then
    /// served (inferred and handed to the producer) in `service`: the controller's step.
    /// A breach of the target cuts the limit by a quarter; slack while the limit was what
    /// bounded the batch raises it by one. Between the two it holds.
    pub fn observe(&mut self, size: usize, queued: Duration, service: Duration) {
        let Some(target) = self.target else { return };
        let latency = queued + service;
        if latency > target {
            let cut = (self.limit as f64 * BACKOFF) as usize;
            self.limit = cut.min(self.limit - 1).max(1);
        } else if latency.as_secs_f64() < target.as_secs_f64() * SLACK && size >= self.limit {
            self.limit = (self.limit + 1).min(self.max_size);
        }
    }
}

/// What the inference thread gets from [`BatchQueue::next`].
#[derive(Debug)]
pub enum Next {
    /// A batch, and how long its oldest frame queued for it.
    Batch(Batch, Duration),
    /// Nothing came within the idle slice.
    Idle,
    /// The intake closed the queue and everything was taken.
    Closed,
}

struct Building {
    batch: Batch,
    first_at: Option<Instant>,
    policy: BatchPolicy,
    closed: bool,
}

/// The batch being built, shared by the intake thread (which fills it) and the inference thread
/// (which takes it when the policy says so). It holds at most one batch: while the model runs,
/// the next batch fills, and the intake waits once it reaches the limit.
pub struct BatchQueue {
    input_len: usize,
    state: Mutex<Building>,
    /// Signals the inference thread: a frame arrived, or the queue closed.
    filled: Condvar,
    /// Signals the intake thread: the batch was taken, so there is room.
    room: Condvar,
}

impl BatchQueue {
    pub fn new(policy: BatchPolicy, input_len: usize) -> Self {
        let batch = Self::empty(policy.max_size, input_len);
        BatchQueue {
            input_len,
            state: Mutex::new(Building { batch, first_at: None, policy, closed: false }),
            filled: Condvar::new(),
            room: Condvar::new(),
        }
    }

    fn empty(max_size: usize, input_len: usize) -> Batch {
        Batch { input: Vec::with_capacity(max_size * input_len), frames: Vec::with_capacity(max_size) }
    }

    /// Waits up to `timeout` until the batch being built is below the limit; true if it is.
    pub fn wait_for_room(&self, timeout: Duration) -> bool {
        let s = self.state.lock().unwrap();
        let (s, _) = self.room.wait_timeout_while(s, timeout, |s| s.batch.len() >= s.policy.limit).unwrap();
        s.batch.len() < s.policy.limit
    }

    /// Adds a preprocessed frame (`tensor` is one model input) to the batch being built.
    /// The intake checks [`wait_for_room`](Self::wait_for_room) first; the limit can only
    /// shrink meanwhile, so the batch never passes `max_size`.
    pub fn push(&self, meta: FrameMeta, tensor: &[f32]) {
        debug_assert_eq!(tensor.len(), self.input_len);
        self.append(self.state.lock().unwrap(), meta, tensor);
    }

    fn append(&self, mut s: std::sync::MutexGuard<'_, Building>, meta: FrameMeta, tensor: &[f32]) {
        s.batch.input.extend_from_slice(tensor);
        s.batch.frames.push(meta);
        s.first_at.get_or_insert_with(Instant::now);
        drop(s);
        self.filled.notify_one();
    }

    /// Adds a preprocessed frame once the batch being built is below the limit: for several
    /// threads that push at once, the wait and the push are one step. Gives up (false, nothing
    /// added) if `give_up` says so on a wake-up: every [`wake`](Self::wake), every batch taken
    /// and at least every 100 ms.
    pub fn push_when_room(&self, meta: FrameMeta, tensor: &[f32], give_up: impl Fn() -> bool) -> bool {
        debug_assert_eq!(tensor.len(), self.input_len);
        let mut s = self.state.lock().unwrap();
        while s.batch.len() >= s.policy.limit {
            if give_up() {
                return false;
            }
            s = self.room.wait_timeout(s, Duration::from_millis(100)).unwrap().0;
        }
        self.append(s, meta, tensor);
        true
    }

    /// For the inference thread, once free: the next batch as soon as the policy dispatches
    /// it, [`Next::Idle`] if nothing came within `idle`, or [`Next::Closed`]. After
    /// [`close`](Self::close) a partial batch goes at once.
    pub fn next(&self, idle: Duration) -> Next {
        let mut s = self.state.lock().unwrap();
        loop {
            let waited = s.first_at.map_or(Duration::ZERO, |t| t.elapsed());
            let wait = match s.policy.decide(s.batch.len(), waited) {
                Decision::Dispatch => None,
                Decision::Wait(_) if s.closed => None,
                Decision::Wait(left) => Some(left),
                Decision::Idle if s.closed => return Next::Closed,
                Decision::Idle => {
                    let (guard, timeout) = self.filled.wait_timeout(s, idle).unwrap();
                    s = guard;
                    if timeout.timed_out() && s.batch.is_empty() && !s.closed {
                        return Next::Idle;
                    }
                    continue;
                }
            };
            match wait {
                Some(left) => s = self.filled.wait_timeout(s, left).unwrap().0,
                None => {
                    let max_size = s.policy.max_size;
                    let batch = std::mem::replace(&mut s.batch, Self::empty(max_size, self.input_len));
                    s.first_at = None;
                    drop(s);
                    self.room.notify_all();
                    return Next::Batch(batch, waited);
                }
            }
        }
    }

    /// The controller's step after a batch (see [`BatchPolicy::observe`]); returns the new limit.
    pub fn observe(&self, size: usize, queued: Duration, service: Duration) -> usize {
        let mut s = self.state.lock().unwrap();
        s.policy.observe(size, queued, service);
        let limit = s.policy.limit();
        drop(s);
        // A higher limit is room for the intake.
        self.room.notify_all();
        limit
    }

    pub fn limit(&self) -> usize {
        self.state.lock().unwrap().policy.limit()
    }

    /// No more frames will come: the inference thread takes what is left, then gets `Closed`.
    pub fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.filled.notify_all();
    }

    /// Wakes the intake if it waits for room (the inference thread stopped).
    pub fn wake(&self) {
        self.room.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn meta(offset: i64) -> FrameMeta {
        FrameMeta {
            partition: 0,
            offset,
            key: None,
            seq: None,
            truth: None,
            ts_produce_ms: None,
            fetch_us: 0,
            decode_us: 0,
            queued_at: Instant::now(),
            value: Vec::new(),
            headers: None,
        }
    }

    #[test]
    fn greedy_by_default_a_free_model_takes_one_frame_at_once() {
        let p = BatchPolicy::new(40, Duration::ZERO, None);
        assert_eq!(p.decide(0, Duration::ZERO), Decision::Idle);
        assert_eq!(p.decide(1, Duration::ZERO), Decision::Dispatch, "no window: one frame goes alone");
        assert_eq!(p.decide(17, Duration::ZERO), Decision::Dispatch);
        assert_eq!(p.limit(), 40);
    }

    #[test]
    fn the_optional_fill_wait_holds_a_partial_batch_until_full_or_due() {
        let p = BatchPolicy::new(4, 20 * MS, None);
        assert_eq!(p.decide(1, 5 * MS), Decision::Wait(15 * MS));
        assert_eq!(p.decide(3, 19 * MS), Decision::Wait(MS));
        assert_eq!(p.decide(4, Duration::ZERO), Decision::Dispatch, "full");
        assert_eq!(p.decide(1, 20 * MS), Decision::Dispatch, "due");
    }

    #[test]
    fn batches_grow_by_themselves_while_the_model_is_busy() {
        let q = BatchQueue::new(BatchPolicy::new(8, Duration::ZERO, None), 1);
        q.push(meta(0), &[0.0]);
        let Next::Batch(first, _) = q.next(MS) else { panic!("one frame ready") };
        assert_eq!(first.len(), 1, "light load: the frame goes alone");
        // While that batch is "inferred", five frames arrive; the next take has all of them.
        for o in 1..=5 {
            assert!(q.wait_for_room(Duration::ZERO));
            q.push(meta(o), &[o as f32]);
        }
        let Next::Batch(second, _) = q.next(MS) else { panic!("five frames ready") };
        assert_eq!(second.len(), 5);
        assert_eq!(second.input, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        // At the limit the intake waits: the batch never passes max_size.
        for o in 6..14 {
            q.push(meta(o), &[0.0]);
        }
        assert!(!q.wait_for_room(MS), "8 frames: full");
        let Next::Batch(third, _) = q.next(MS) else { panic!("full batch") };
        assert_eq!(third.len(), 8);
        assert!(q.wait_for_room(Duration::ZERO));
        assert!(matches!(q.next(MS), Next::Idle));
    }

    #[test]
    fn a_push_wakes_the_waiting_model_at_once() {
        let q = std::sync::Arc::new(BatchQueue::new(BatchPolicy::new(8, Duration::ZERO, None), 1));
        let taker = {
            let q = q.clone();
            std::thread::spawn(move || {
                let asked = Instant::now();
                loop {
                    match q.next(Duration::from_secs(10)) {
                        Next::Batch(b, _) => return (b.len(), asked.elapsed()),
                        Next::Idle => continue,
                        Next::Closed => panic!("closed"),
                    }
                }
            })
        };
        q.push(meta(0), &[1.0]);
        let (len, waited) = taker.join().unwrap();
        assert_eq!(len, 1);
        assert!(waited < Duration::from_secs(10), "woken by the push, not by the idle slice: {waited:?}");
    }

    #[test]
    fn closing_flushes_a_held_partial_batch_then_ends() {
        let q = BatchQueue::new(BatchPolicy::new(8, Duration::from_secs(60), None), 1);
        q.push(meta(0), &[1.0]);
        q.close();
        let Next::Batch(b, _) = q.next(MS) else { panic!("the partial batch goes at close") };
        assert_eq!(b.len(), 1);
        assert!(matches!(q.next(MS), Next::Closed));
    }

    #[test]
    fn with_a_target_the_limit_starts_at_one_and_grows_on_slack_when_it_binds() {
        let mut p = BatchPolicy::new(40, Duration::ZERO, Some(10 * MS));
        assert_eq!(p.limit(), 1);
        // Slack (2 ms < 8 ms) and full batches: additive increase, one a batch.
        for expected in 2..=5 {
            p.observe(p.limit(), MS, MS);
            assert_eq!(p.limit(), expected);
        }
        // Slack but the batch was smaller than the limit (light load): no reason to grow.
        p.observe(2, MS, MS);
        assert_eq!(p.limit(), 5);
        // Inside the band (8..=10 ms): hold.
        p.observe(5, 4 * MS, 5 * MS);
        assert_eq!(p.limit(), 5);
        // It never passes max_size.
        for _ in 0..100 {
            p.observe(p.limit(), Duration::ZERO, MS);
        }
        assert_eq!(p.limit(), 40);
    }

    #[test]
    fn with_a_target_a_breach_cuts_the_limit_multiplicatively_down_to_one() {
        let mut p = BatchPolicy::new(40, Duration::ZERO, Some(10 * MS));
        for _ in 0..100 {
            p.observe(p.limit(), Duration::ZERO, MS);
        }
        assert_eq!(p.limit(), 40);
        p.observe(40, 6 * MS, 6 * MS);
        assert_eq!(p.limit(), 30, "a quarter off");
        p.observe(30, 6 * MS, 6 * MS);
        assert_eq!(p.limit(), 22);
        for _ in 0..20 {
            p.observe(p.limit(), 20 * MS, 20 * MS);
        }
        assert_eq!(p.limit(), 1, "never below one");
        // A small limit still drops by at least one per breach.
        let mut p = BatchPolicy::new(40, Duration::ZERO, Some(10 * MS));
        p.observe(1, Duration::ZERO, MS);
        p.observe(2, Duration::ZERO, MS);
        assert_eq!(p.limit(), 3);
        p.observe(3, 11 * MS, Duration::ZERO);
        assert_eq!(p.limit(), 2);
    }

    #[test]
    fn without_a_target_observations_change_nothing() {
        let mut p = BatchPolicy::new(16, Duration::ZERO, None);
        p.observe(16, Duration::from_secs(5), Duration::from_secs(5));
        assert_eq!(p.limit(), 16);
    }
}
