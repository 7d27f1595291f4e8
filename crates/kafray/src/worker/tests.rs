//! The worker's data path without a broker: a scripted source and sink around real batching,
//! offsets and a fake model.
use super::*;
use crate::frame::{HEADER_FORMAT, HEADER_SHAPE};
use crate::metrics::DeadLetterReason;
use crate::model::testing::{pixel_model, Pixel, POISON};
use crate::sink::{now_ms, Ack, Prediction, Refused, SinkContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Message;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;

const TOPIC: &str = "frames";

enum Event {
    Frame(OwnedMessage),
    Revoke(Vec<i32>),
    Assign(Vec<i32>),
}

/// Serves events in order; a revoke runs the same handler as the Kafka consumer's. Pauses
/// are kept per partition across a revoke and an assignment, as librdkafka keeps them: a
/// paused partition's frames wait in the queue, and only a resume lets them through.
struct FakeSource {
    events: Mutex<VecDeque<Event>>,
    arrived: Condvar,
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    assigned: Mutex<BTreeSet<i32>>,
    assignment_changes: AtomicUsize,
    paused: Mutex<BTreeSet<i32>>,
    stored: Mutex<HashMap<i32, i64>>,
    committed: Mutex<HashMap<i32, i64>>,
    failing_stores: AtomicUsize,
    store_calls: AtomicUsize,
}

impl FakeSource {
    fn push(&self, events: impl IntoIterator<Item = Event>) {
        self.events.lock().unwrap().extend(events);
        self.arrived.notify_all();
    }
    fn stored(&self, partition: i32) -> Option<i64> {
        self.stored.lock().unwrap().get(&partition).copied()
    }
    fn paused(&self) -> BTreeSet<i32> {
        self.paused.lock().unwrap().clone()
    }
    /// The first event that can be served now: a frame of a paused partition waits.
    fn next_event(&self, events: &mut VecDeque<Event>) -> Option<Event> {
        let paused = self.paused.lock().unwrap();
        let i = events.iter().position(|e| !matches!(e, Event::Frame(m) if paused.contains(&m.partition())))?;
        events.remove(i)
    }
}

impl FrameSource for FakeSource {
    type Frame<'a> = OwnedMessage;

    fn poll(&self, timeout: Duration) -> Option<KafkaResult<OwnedMessage>> {
        let deadline = Instant::now() + timeout;
        let mut events = self.events.lock().unwrap();
        let event = loop {
            if let Some(event) = self.next_event(&mut events) {
                break event;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            events = self.arrived.wait_timeout(events, left).unwrap().0;
        };
        drop(events);
        match event {
            Event::Frame(m) => Some(Ok(m)),
            Event::Revoke(parts) => {
                source::on_revoke(self, TOPIC, &self.tracker, &parts);
                let mut assigned = self.assigned.lock().unwrap();
                assigned.retain(|p| !parts.contains(p));
                self.metrics.joined.store(!assigned.is_empty(), SeqCst);
                self.assignment_changes.fetch_add(1, SeqCst);
                None
            }
            Event::Assign(parts) => {
                self.assigned.lock().unwrap().extend(parts);
                self.metrics.joined.store(true, SeqCst);
                self.assignment_changes.fetch_add(1, SeqCst);
                None
            }
        }
    }
    fn owned_partitions(&self) -> (u64, Vec<i32>) {
        let changes = self.assignment_changes.load(SeqCst) as u64;
        (changes, self.assigned.lock().unwrap().iter().copied().collect())
    }
    fn pause_partitions(&self, _topic: &str, partitions: &[i32]) -> KafkaResult<()> {
        self.paused.lock().unwrap().extend(partitions);
        Ok(())
    }
    fn resume_partitions(&self, _topic: &str, partitions: &[i32]) -> KafkaResult<()> {
        self.paused.lock().unwrap().retain(|p| !partitions.contains(p));
        self.arrived.notify_all();
        Ok(())
    }
    fn store_offset(&self, _topic: &str, partition: i32, next: i64) -> KafkaResult<()> {
        self.store_calls.fetch_add(1, SeqCst);
        if self.failing_stores.load(SeqCst) > 0 {
            self.failing_stores.fetch_sub(1, SeqCst);
            return Err(KafkaError::StoreOffset(RDKafkaErrorCode::Fail));
        }
        if !self.assigned.lock().unwrap().contains(&partition) {
            return Err(KafkaError::StoreOffset(RDKafkaErrorCode::State));
        }
        self.stored.lock().unwrap().insert(partition, next);
        Ok(())
    }
    fn commit_now(&self) -> KafkaResult<()> {
        *self.committed.lock().unwrap() = self.stored.lock().unwrap().clone();
        Ok(())
    }
    fn leave(&self) {}
}

/// Acknowledges at once, or holds acknowledgements for the test to release; can fail the
/// delivery of one frame for good, or have the broker refuse one frame's prediction or its
/// dead letter. The broker's answers are settled by the Kafka sink's own [`SinkContext`].
struct FakeSink {
    context: SinkContext,
    hold: AtomicBool,
    held: Mutex<Vec<Ack>>,
    fail_offset: Option<i64>,
    refuse_offset: Option<i64>,
    /// The broker refuses the dead letter of this frame while it carries the frame's value
    /// (and without it too, if `refuse_bare`).
    refuse_dead_letter_offset: Option<i64>,
    refuse_bare: bool,
    /// While closed, a dead letter waits in `dead_letter` (its sender is held up on it).
    dead_letter_gate: Mutex<bool>,
    gate_opened: Condvar,
    predicted: Mutex<Vec<(i64, usize)>>,
    /// Dead letters sent: offset, reason, and whether the frame's value was left out.
    dead: Mutex<Vec<(i64, String, bool)>>,
}

impl FakeSink {
    fn send(&self, ack: Ack) {
        let refuse = |code| self.context.settle(&ack, Err(&KafkaError::MessageProduction(code)), TOPIC, None);
        if Some(ack.offset) == self.refuse_offset && ack.dead_letter.is_none() {
            refuse(RDKafkaErrorCode::MessageSizeTooLarge);
        } else if Some(ack.offset) == self.refuse_dead_letter_offset
            && ack.dead_letter.is_some()
            && (!ack.bare || self.refuse_bare)
        {
            let reason = self.dead.lock().unwrap().last().map(|d| d.1.clone());
            let error = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
            self.context.settle(&ack, Err(&error), "frames.dlq", reason.as_deref());
        } else if Some(ack.offset) == self.fail_offset {
            self.context.settle(
                &ack,
                Err(&KafkaError::MessageProduction(RDKafkaErrorCode::RequestTimedOut)),
                TOPIC,
                None,
            );
        } else if self.hold.load(SeqCst) {
            self.held.lock().unwrap().push(ack);
        } else {
            self.context.settle(&ack, Ok(()), TOPIC, None);
        }
    }
    /// Acknowledges the held results, in the order given by offset.
    fn release(&self, offsets: &[i64]) {
        let mut held = self.held.lock().unwrap();
        for o in offsets {
            let i = held.iter().position(|a| a.offset == *o).expect("held");
            self.context.settle(&held.remove(i), Ok(()), TOPIC, None);
        }
    }
    fn open_dead_letter_gate(&self) {
        *self.dead_letter_gate.lock().unwrap() = false;
        self.gate_opened.notify_all();
    }
    fn release_all(&self) {
        let offsets: Vec<i64> = self.held.lock().unwrap().iter().map(|a| a.offset).collect();
        self.release(&offsets);
    }
}

impl ResultSink for FakeSink {
    fn predict(&self, _key: Option<&[u8]>, p: &Prediction, _truth: Option<&str>, ack: Ack) -> Result<()> {
        self.predicted.lock().unwrap().push((p.offset, p.class));
        self.send(ack);
        Ok(())
    }
    fn dead_letter(
        &self,
        _key: Option<&[u8]>,
        value: &[u8],
        _headers: Option<OwnedHeaders>,
        reason: &str,
        class: DeadLetterReason,
        ack: Ack,
    ) -> Result<()> {
        let gate = self.dead_letter_gate.lock().unwrap();
        drop(self.gate_opened.wait_while(gate, |closed| *closed).unwrap());
        self.dead.lock().unwrap().push((ack.offset, reason.to_string(), value.is_empty()));
        self.send(Ack { dead_letter: Some(class), bare: value.is_empty(), ..ack });
        Ok(())
    }
    fn flush(&self, _timeout: Duration) -> Result<()> {
        self.release_all();
        Ok(())
    }
    fn failure(&self) -> Option<String> {
        self.context.failure()
    }
    fn take_refused(&self) -> Vec<Refused> {
        self.context.take_refused()
    }
}

fn frame(partition: i32, offset: i64, pixel: u8) -> Event {
    let headers = OwnedHeaders::new()
        .insert(Header { key: HEADER_FORMAT, value: Some("raw") })
        .insert(Header { key: HEADER_SHAPE, value: Some("1x1x1") });
    let ts = Timestamp::CreateTime(now_ms());
    Event::Frame(OwnedMessage::new(Some(vec![pixel]), None, TOPIC.into(), ts, partition, offset, Some(headers)))
}

fn frames(partition: i32, offsets: std::ops::Range<i64>) -> Vec<Event> {
    offsets.map(|o| frame(partition, o, (o % 10) as u8)).collect()
}

struct Harness {
    source: Arc<FakeSource>,
    sink: Arc<FakeSink>,
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    worker: JoinHandle<Result<Snapshot>>,
}

/// What a test changes of the fake broker and the worker's settings.
#[derive(Default)]
struct Setup {
    hold: bool,
    fail_offset: Option<i64>,
    refuse_offset: Option<i64>,
    refuse_dead_letter_offset: Option<i64>,
    refuse_bare: bool,
    max_in_flight: Option<usize>,
    stall_after_s: Option<u64>,
    decode_threads: Option<usize>,
    close_dead_letter_gate: bool,
}

fn start(model: Model, hold: bool, fail_offset: Option<i64>, events: Vec<Event>) -> Harness {
    start_with(model, Setup { hold, fail_offset, ..Setup::default() }, events)
}

fn start_with(model: Model, setup: Setup, events: Vec<Event>) -> Harness {
    let (tracker, metrics) = (Arc::new(OffsetTracker::new()), Arc::new(Metrics::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let source = Arc::new(FakeSource {
        events: Mutex::new(VecDeque::new()),
        arrived: Condvar::new(),
        tracker: tracker.clone(),
        metrics: metrics.clone(),
        assigned: Mutex::new([0, 1].into()),
        assignment_changes: AtomicUsize::new(1),
        paused: Default::default(),
        stored: Default::default(),
        committed: Default::default(),
        failing_stores: AtomicUsize::new(0),
        store_calls: AtomicUsize::new(0),
    });
    metrics.joined.store(true, SeqCst);
    source.push(events);
    let sink = Arc::new(FakeSink {
        context: SinkContext::new(tracker.clone(), metrics.clone()),
        hold: AtomicBool::new(setup.hold),
        held: Default::default(),
        fail_offset: setup.fail_offset,
        refuse_offset: setup.refuse_offset,
        refuse_dead_letter_offset: setup.refuse_dead_letter_offset,
        refuse_bare: setup.refuse_bare,
        dead_letter_gate: Mutex::new(setup.close_dead_letter_gate),
        gate_opened: Condvar::new(),
        predicted: Default::default(),
        dead: Default::default(),
    });
    let defaults = WorkerConfig::default();
    let config = WorkerConfig {
        batch_size: 4,
        status_interval_s: 0,
        worker_id: Some("fake".into()),
        max_in_flight: setup.max_in_flight.unwrap_or(defaults.max_in_flight),
        stall_after_s: setup.stall_after_s.unwrap_or(defaults.stall_after_s),
        decode_threads: Some(setup.decode_threads.unwrap_or(1)),
        ..defaults
    }
    .validated()
    .unwrap();
    let worker = {
        let (source, sink, tracker, stop, metrics) =
            (source.clone(), sink.clone(), tracker.clone(), stop.clone(), metrics.clone());
        std::thread::spawn(move || run_pipeline(&config, model, source.as_ref(), sink, tracker, stop, metrics))
    };
    Harness { source, sink, tracker, metrics, stop, worker }
}

/// Polls a condition (the worker runs on its own threads) until it holds, or fails.
fn wait_until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Harness {
    fn finish(self) -> (Result<Snapshot>, HashMap<i32, i64>) {
        self.stop.store(true, SeqCst);
        self.source.arrived.notify_all();
        let outcome = self.worker.join().unwrap();
        let committed = self.source.committed.lock().unwrap().clone();
        (outcome, committed)
    }
    /// Waits for the worker to end by itself (an error), however long a stall would last.
    fn ended(self) -> (Result<Snapshot>, HashMap<i32, i64>) {
        wait_until("the worker to stop by itself", || self.worker.is_finished());
        self.finish()
    }
    fn held(&self) -> usize {
        self.sink.held.lock().unwrap().len()
    }
}

#[test]
fn acknowledgements_out_of_order_store_only_below_the_oldest_unacknowledged_frame() {
    let h = start(pixel_model(Pixel::default()), true, None, frames(0, 0..8));
    wait_until("8 results sent", || h.held() == 8);
    h.sink.release(&[7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(h.tracker.in_flight(), 1);
    assert!(h.tracker.committable().is_empty(), "frame 0 is not acknowledged: nothing is safe");
    assert_eq!(h.source.stored(0), None);
    h.sink.release(&[0]);
    wait_until("offset 8 stored", || h.source.stored(0) == Some(8));
    let (outcome, committed) = h.finish();
    assert_eq!(outcome.unwrap().predicted, 8);
    assert_eq!(committed[&0], 8);
}

#[test]
fn a_revoke_with_frames_in_flight_forgets_them_and_the_partition_can_come_back() {
    let h = start(pixel_model(Pixel::default()), true, None, frames(0, 0..4));
    wait_until("4 results sent", || h.held() == 4);
    h.source.push([Event::Revoke(vec![0])]);
    wait_until("the revoked frames forgotten", || h.tracker.in_flight() == 0);
    h.sink.release(&[2, 0, 1, 3]); // late acknowledgements of a partition no longer owned
    assert_eq!(h.tracker.in_flight(), 0);
    assert_eq!(h.source.stored(0), None, "nothing was stored for a partition it no longer owns");
    // The partition comes back, read again from the last commit.
    h.sink.hold.store(false, SeqCst);
    h.source.push(std::iter::once(Event::Assign(vec![0])).chain(frames(0, 0..4)));
    wait_until("offset 4 stored", || h.source.stored(0) == Some(4));
    let (outcome, committed) = h.finish();
    outcome.unwrap();
    assert_eq!(committed[&0], 4);
}

#[test]
fn a_failed_delivery_stops_the_worker_and_nothing_past_it_is_stored() {
    let h = start(pixel_model(Pixel::default()), false, Some(2), frames(0, 0..6));
    let (outcome, committed) = h.ended();
    let err = outcome.unwrap_err().to_string();
    assert!(err.contains("failed for frame 0@2"), "{err}");
    assert_eq!(committed.get(&0), Some(&2), "frames 0 and 1 are safe; 2 must be read again");
}

#[test]
fn a_broken_model_stops_the_worker_without_storing_its_frames() {
    let backend = Pixel::default();
    let model = pixel_model(backend.clone());
    backend.broken.store(true, SeqCst);
    let h = start(model, false, None, frames(0, 0..4));
    let (outcome, committed) = h.ended();
    assert!(outcome.unwrap_err().to_string().contains("the device is gone"));
    assert_eq!(committed.get(&0), None, "the frames are read again after a restart");
}

#[test]
fn a_poison_frame_is_dead_lettered_and_the_stream_goes_on() {
    let events = vec![frame(0, 0, 1), frame(0, 1, POISON as u8), frame(0, 2, 2), frame(0, 3, 3)];
    let h = start(pixel_model(Pixel::default()), false, None, events);
    wait_until("offset 4 stored", || h.source.stored(0) == Some(4));
    let dead = h.sink.dead.lock().unwrap().clone();
    let mut predicted = h.sink.predicted.lock().unwrap().clone();
    let (outcome, _) = h.finish();
    let last = outcome.unwrap();
    assert_eq!((last.predicted, last.dead_lettered), (3, 1));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, 1);
    assert!(dead[0].1.contains("the model failed on this frame"), "{dead:?}");
    predicted.sort();
    assert_eq!(predicted, vec![(0, 1), (2, 2), (3, 3)]);
}

#[test]
fn a_short_model_answer_stops_the_worker_instead_of_stalling_it() {
    let backend = Pixel::default();
    let model = pixel_model(backend.clone());
    backend.short.store(true, SeqCst);
    let h = start(model, false, None, frames(0, 0..4));
    let (outcome, committed) = h.ended();
    let err = outcome.unwrap_err().to_string();
    assert!(err.contains("scores for a batch of"), "{err}");
    assert_eq!(committed.get(&0), None);
}

#[test]
fn a_prediction_the_broker_refuses_dead_letters_its_frame_and_the_stream_goes_on() {
    let setup = Setup { refuse_offset: Some(1), ..Setup::default() };
    let h = start_with(pixel_model(Pixel::default()), setup, frames(0, 0..4));
    wait_until("offset 4 stored", || h.source.stored(0) == Some(4));
    let dead = h.sink.dead.lock().unwrap().clone();
    let (outcome, committed) = h.finish();
    let last = outcome.unwrap();
    assert_eq!((last.predicted, last.dead_lettered, last.dead_letter_fallbacks), (3, 1, 1));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, 1);
    assert!(dead[0].1.contains("refused its prediction") && dead[0].1.contains("left out"), "{dead:?}");
    assert_eq!(committed[&0], 4);
}

#[test]
fn a_failed_offset_store_is_tried_again() {
    let h = start(pixel_model(Pixel::default()), false, None, Vec::new());
    h.source.failing_stores.store(3, SeqCst);
    h.source.push(frames(1, 10..14));
    wait_until("offset 14 stored", || h.source.stored(1) == Some(14));
    assert!(h.source.store_calls.load(SeqCst) >= 4, "three failed stores, then one that worked");
    let (outcome, committed) = h.finish();
    outcome.unwrap();
    assert_eq!(committed[&1], 14);
}

#[test]
fn a_poison_frame_that_comes_first_is_dead_lettered_and_the_stream_goes_on() {
    // The model has classified nothing yet when the poison frame comes, alone in its batch.
    let events = vec![frame(0, 0, POISON as u8), frame(0, 1, 1), frame(0, 2, 2)];
    let h = start(pixel_model(Pixel::default()), false, None, events);
    wait_until("offset 3 stored", || h.source.stored(0) == Some(3));
    let dead = h.sink.dead.lock().unwrap().clone();
    let (outcome, committed) = h.finish();
    let last = outcome.unwrap();
    assert_eq!((last.predicted, last.dead_lettered), (2, 1));
    assert_eq!(dead[0].0, 0);
    assert_eq!(committed[&0], 3);
}

#[test]
fn a_dead_letter_the_broker_refuses_goes_again_without_the_value_and_the_stream_goes_on() {
    let events = vec![frame(0, 0, 1), frame(0, 1, POISON as u8), frame(0, 2, 2), frame(0, 3, 3)];
    let setup = Setup { refuse_dead_letter_offset: Some(1), ..Setup::default() };
    let h = start_with(pixel_model(Pixel::default()), setup, events);
    wait_until("offset 4 stored", || h.source.stored(0) == Some(4) || h.worker.is_finished());
    let dead = h.sink.dead.lock().unwrap().clone();
    let (outcome, committed) = h.finish();
    let last = outcome.expect("a refused dead letter is no reason to stop");
    assert_eq!((last.predicted, last.dead_lettered, last.dead_letter_fallbacks), (3, 1, 1));
    assert_eq!(dead.len(), 2, "the dead letter with the value, then the bare one: {dead:?}");
    let (offset, reason, bare) = &dead[1];
    assert_eq!((*offset, *bare), (1, true), "{dead:?}");
    assert!(
        reason.contains("the model failed on this frame") && reason.contains("refused its dead letter"),
        "the bare dead letter keeps the first reason and says why it is bare: {reason}"
    );
    assert_eq!(committed[&0], 4);
}

#[test]
fn a_bare_dead_letter_the_broker_refuses_stops_the_worker_without_storing_past_it() {
    // Refused even without its value: nothing is left to try, and the frame must be read again.
    let events = vec![frame(0, 0, 1), frame(0, 1, POISON as u8), frame(0, 2, 2)];
    let setup = Setup { refuse_dead_letter_offset: Some(1), refuse_bare: true, ..Setup::default() };
    let h = start_with(pixel_model(Pixel::default()), setup, events);
    let (outcome, committed) = h.ended();
    let err = outcome.unwrap_err().to_string();
    assert!(err.contains("frames.dlq failed for frame 0@1"), "{err}");
    assert_eq!(committed.get(&0), Some(&1));
}

#[test]
fn the_restart_budget_resets_only_past_the_frame_that_failed() {
    let metrics = Metrics::new();
    let mut budget = RestartBudget::default();
    metrics.progressed(0, 10);
    assert_eq!(budget.after_failure(Some((0, 10)), &metrics), Some(Duration::from_secs(1)));
    // Other partitions (and frames of this one before it) go on; the failing frame does not.
    metrics.progressed(1, 500);
    assert_eq!(budget.after_failure(Some((0, 10)), &metrics), Some(Duration::from_secs(2)));
    metrics.progressed(1, 900);
    assert_eq!(budget.after_failure(Some((0, 10)), &metrics), Some(Duration::from_secs(4)));
    metrics.progressed(1, 1200);
    assert_eq!(budget.after_failure(Some((0, 10)), &metrics), None, "the same frame, three times: give up");
    // Progress past the frame that failed: a later failure starts a new count.
    let mut budget = RestartBudget::default();
    budget.after_failure(Some((0, 10)), &metrics);
    budget.after_failure(Some((0, 10)), &metrics);
    metrics.progressed(0, 11);
    assert_eq!(budget.after_failure(Some((0, 40)), &metrics), Some(Duration::from_secs(1)));
}

#[test]
fn a_small_in_flight_bound_drains_a_backlog_without_pausing() {
    let setup = Setup { max_in_flight: Some(4), ..Setup::default() };
    let h = start_with(pixel_model(Pixel::default()), setup, frames(0, 0..400));
    wait_until("offset 400 stored", || h.source.stored(0) == Some(400));
    assert!(h.source.paused().is_empty());
    let (outcome, _) = h.finish();
    let last = outcome.unwrap();
    assert_eq!(last.predicted, 400);
}

/// librdkafka keeps an application's pause across a revoke and a re-assignment (the fake
/// does too): a partition paused under a long hold, taken away and given back must flow.
#[test]
fn a_partition_paused_then_revoked_and_given_back_is_resumed() {
    let setup = Setup { hold: true, max_in_flight: Some(4), ..Setup::default() };
    let mut events = frames(0, 0..2);
    events.extend(frames(1, 0..2));
    let h = start_with(pixel_model(Pixel::default()), setup, events);
    wait_until("4 results held", || h.sink.held.lock().unwrap().len() == 4);
    // A hold longer than PAUSE_AFTER pauses both partitions.
    wait_until("both partitions paused", || h.source.paused() == [0, 1].into());
    h.source.push([Event::Revoke(vec![0])]);
    wait_until("partition 0's frames forgotten", || h.tracker.in_flight() == 2);
    h.sink.hold.store(false, SeqCst);
    h.sink.release_all();
    // At light load now: nothing holds, and partition 0 comes back with more frames.
    let mut back = vec![Event::Assign(vec![0])];
    back.extend(frames(0, 2..6));
    back.extend(frames(1, 2..4));
    h.source.push(back);
    wait_until("partition 0 read to offset 6", || h.source.stored(0) == Some(6));
    wait_until("partition 1 read to offset 4", || h.source.stored(1) == Some(4));
    assert!(h.source.paused().is_empty(), "{:?}", h.source.paused());
    let (outcome, _) = h.finish();
    outcome.unwrap();
}

#[test]
fn a_partition_left_unread_while_the_worker_idles_is_stalled_and_the_worker_degraded() {
    let setup = Setup { stall_after_s: Some(1), ..Setup::default() };
    let h = start_with(pixel_model(Pixel::default()), setup, frames(0, 0..3));
    wait_until("offset 3 stored", || h.source.stored(0) == Some(3));
    wait_until("ready", || h.metrics.health().state == WorkerState::Ready);
    // Partition 1 has frames to read (librdkafka's statistics say so) and not one comes:
    // paused behind kafray's back, as hole 1 left partitions, while the worker idles.
    h.source.pause_partitions(TOPIC, &[1]).unwrap();
    h.source.push(frames(1, 0..3));
    *h.metrics.partition_backlog.lock().unwrap() = vec![(0, 0), (1, 3)];
    wait_until("partition 1 stalled", || *h.metrics.stalled_partitions.lock().unwrap() == vec![1]);
    let health = h.metrics.health();
    assert_eq!(health.state, WorkerState::Degraded);
    assert!(health.reason.as_deref().unwrap_or_default().contains("partition(s) [1] stalled"), "{health:?}");
    assert_eq!(h.metrics.partition_stalls.load(SeqCst), 1);
    // It flows again: the stall clears, and the worker is ready.
    h.source.resume_partitions(TOPIC, &[1]).unwrap();
    wait_until("offset 3 stored on partition 1", || h.source.stored(1) == Some(3));
    *h.metrics.partition_backlog.lock().unwrap() = vec![(0, 0), (1, 0)];
    wait_until("ready again", || h.metrics.health().state == WorkerState::Ready);
    assert!(h.metrics.stalled_partitions.lock().unwrap().is_empty());
    let (outcome, _) = h.finish();
    outcome.unwrap();
}

#[test]
fn frames_that_get_no_result_stall_their_partition_until_results_come() {
    let setup = Setup { stall_after_s: Some(1), hold: true, ..Setup::default() };
    let h = start_with(pixel_model(Pixel::default()), setup, frames(1, 0..2));
    wait_until("partition 1 stalled", || *h.metrics.stalled_partitions.lock().unwrap() == vec![1]);
    assert_eq!(h.metrics.health().state, WorkerState::Degraded);
    h.sink.hold.store(false, SeqCst);
    h.sink.release_all();
    wait_until("ready again", || h.metrics.health().state == WorkerState::Ready);
    assert!(h.metrics.stalled_partitions.lock().unwrap().is_empty());
    let (outcome, _) = h.finish();
    outcome.unwrap();
}

#[test]
fn a_partition_that_has_read_everything_is_no_stall_however_long_it_is_quiet() {
    // Lag by the commit can stay above 0 for good (a transaction marker kafray never stores,
    // data deleted below an old commit): the watchdog judges by what is left to read.
    let setup = Setup { stall_after_s: Some(1), ..Setup::default() };
    let h = start_with(pixel_model(Pixel::default()), setup, frames(0, 0..3));
    wait_until("offset 3 stored", || h.source.stored(0) == Some(3));
    *h.metrics.partition_lag.lock().unwrap() = vec![(0, 1), (1, 7)];
    *h.metrics.partition_backlog.lock().unwrap() = vec![(0, 0), (1, 0)];
    // Three health checks, a second each, past the limit.
    let checks = Instant::now();
    wait_until("3 s quiet", || checks.elapsed() >= Duration::from_secs(3));
    assert!(h.metrics.stalled_partitions.lock().unwrap().is_empty());
    assert_eq!(h.metrics.health().state, WorkerState::Ready);
    let (outcome, _) = h.finish();
    outcome.unwrap();
}

/// A frame that cannot be decoded (the shape header does not match its bytes).
fn undecodable(partition: i32, offset: i64) -> Event {
    let headers = OwnedHeaders::new()
        .insert(Header { key: HEADER_FORMAT, value: Some("raw") })
        .insert(Header { key: HEADER_SHAPE, value: Some("2x2x1") });
    let ts = Timestamp::CreateTime(now_ms());
    Event::Frame(OwnedMessage::new(Some(vec![1]), None, TOPIC.into(), ts, partition, offset, Some(headers)))
}

#[test]
fn a_decode_pool_predicts_every_frame_once_and_stores_each_partition_in_order() {
    let events: Vec<Event> = (0..300).flat_map(|o| [frame(0, o, (o % 10) as u8), frame(1, o, (o % 7) as u8)]).collect();
    let setup = Setup { hold: true, decode_threads: Some(3), ..Setup::default() };
    let h = start_with(pixel_model(Pixel::default()), setup, events);
    wait_until("600 results sent", || h.held() == 600);
    // Everything acknowledged but frames 0@7 and 1@0: nothing of either partition past them is safe.
    let held: Vec<(i32, i64)> = h.sink.held.lock().unwrap().iter().map(|a| (a.partition, a.offset)).collect();
    for (partition, offset) in held {
        if (partition, offset) != (0, 7) && (partition, offset) != (1, 0) {
            let mut held = h.sink.held.lock().unwrap();
            let i = held.iter().position(|a| (a.partition, a.offset) == (partition, offset)).unwrap();
            h.sink.context.settle(&held.remove(i), Ok(()), TOPIC, None);
        }
    }
    assert_eq!(h.tracker.in_flight(), 2);
    wait_until("offset 7 stored", || h.source.stored(0) == Some(7));
    assert_eq!(h.source.stored(1), None, "1@0 is not acknowledged: nothing of partition 1 is safe");
    h.sink.release_all();
    wait_until("every offset stored", || h.source.stored(0) == Some(300) && h.source.stored(1) == Some(300));
    let mut offsets: Vec<i64> = h.sink.predicted.lock().unwrap().iter().map(|&(offset, _)| offset).collect();
    let (outcome, committed) = h.finish();
    assert_eq!(outcome.unwrap().predicted, 600);
    assert_eq!(committed, HashMap::from([(0, 300), (1, 300)]));
    offsets.sort_unstable();
    let once_per_partition: Vec<i64> = (0..300).flat_map(|o| [o, o]).collect();
    assert_eq!(offsets, once_per_partition, "each offset once on each partition");
}

#[test]
fn a_frame_held_up_in_the_decode_pool_holds_back_its_partition_while_later_frames_pass() {
    // Frame 0@3 cannot be decoded, and its dead letter waits for the broker (the gate), so one
    // decode thread holds it; the other threads decode and the model predicts the frames after it.
    let mut events = frames(0, 0..3);
    events.push(undecodable(0, 3));
    events.extend(frames(0, 4..40));
    let setup = Setup { decode_threads: Some(3), close_dead_letter_gate: true, ..Setup::default() };
    let h = start_with(pixel_model(Pixel::default()), setup, events);
    wait_until("39 frames predicted", || h.metrics.snapshot().predicted == 39);
    // Every offset that is safe now is stored: nothing is left to store.
    wait_until("the safe offset stored", || h.source.stored(0).is_some() && h.tracker.committable().is_empty());
    assert_eq!(h.source.stored(0), Some(3), "0@3 has no result yet: nothing past it is stored");
    assert_eq!(h.tracker.in_flight(), 1);
    h.sink.open_dead_letter_gate();
    wait_until("offset 40 stored", || h.source.stored(0) == Some(40));
    let dead = h.sink.dead.lock().unwrap().clone();
    let (outcome, committed) = h.finish();
    let last = outcome.unwrap();
    assert_eq!((last.predicted, last.dead_lettered), (39, 1));
    assert_eq!(dead[0].0, 3);
    assert!(dead[0].1.contains("shape 2x2x1 needs 4"), "{dead:?}");
    assert_eq!(committed[&0], 40);
}

#[test]
fn a_revoke_while_the_decode_pool_holds_frames_forgets_them_and_the_stream_goes_on() {
    // The revoke comes while frames of partition 0 may still be decoding or batched: their
    // results come after it, for a partition no longer owned.
    let mut events = frames(0, 0..50);
    events.push(Event::Revoke(vec![0]));
    events.extend(frames(1, 0..50));
    let setup = Setup { decode_threads: Some(2), ..Setup::default() };
    let h = start_with(pixel_model(Pixel::default()), setup, events);
    wait_until("partition 1 stored", || h.source.stored(1) == Some(50));
    assert_eq!(h.tracker.in_flight(), 0);
    let predicted = h.sink.predicted.lock().unwrap().clone();
    let (outcome, committed) = h.finish();
    outcome.unwrap();
    assert_eq!(committed[&1], 50);
    assert_eq!(predicted.len(), 100, "every frame polled got its result");
}

#[test]
fn a_broken_model_stops_a_worker_with_a_decode_pool_without_storing_its_frames() {
    let backend = Pixel::default();
    let model = pixel_model(backend.clone());
    backend.broken.store(true, SeqCst);
    let setup = Setup { decode_threads: Some(3), ..Setup::default() };
    let h = start_with(model, setup, frames(0, 0..100));
    let (outcome, committed) = h.ended();
    assert!(outcome.unwrap_err().to_string().contains("the device is gone"));
    assert_eq!(committed.get(&0), None, "the frames are read again after a restart");
}
