//! Micro-batching: a batch is sent when it is full or when its first frame has waited `max_wait`.
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

pub struct Batcher {
    max_size: usize,
    max_wait: Duration,
    input_len: usize,
    current: Batch,
    first_at: Option<Instant>,
}

impl Batcher {
    pub fn new(max_size: usize, max_wait: Duration, input_len: usize) -> Self {
        let max_size = max_size.max(1);
        Batcher { max_size, max_wait, input_len, current: Self::empty(max_size, input_len), first_at: None }
    }

    fn empty(max_size: usize, input_len: usize) -> Batch {
        Batch { input: Vec::with_capacity(max_size * input_len), frames: Vec::with_capacity(max_size) }
    }

    /// Adds a frame whose tensor `fill` writes into its slot; if `fill` fails the slot is dropped.
    pub fn push<E>(&mut self, meta: FrameMeta, fill: impl FnOnce(&mut [f32]) -> Result<(), E>) -> Result<(), E> {
        let start = self.current.input.len();
        self.current.input.resize(start + self.input_len, 0.0);
        if let Err(e) = fill(&mut self.current.input[start..]) {
            self.current.input.truncate(start);
            return Err(e);
        }
        self.current.frames.push(meta);
        self.first_at.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// How long until the current batch must go; `None` when it is empty.
    pub fn time_left(&self) -> Option<Duration> {
        self.first_at.map(|t| self.max_wait.saturating_sub(t.elapsed()))
    }

    /// Full, or its first frame has waited long enough.
    pub fn ready(&self) -> bool {
        self.current.len() >= self.max_size || self.time_left() == Some(Duration::ZERO)
    }

    pub fn take(&mut self) -> Batch {
        self.first_at = None;
        std::mem::replace(&mut self.current, Self::empty(self.max_size, self.input_len))
    }

    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(offset: i64) -> FrameMeta {
        FrameMeta { partition: 0, offset, key: None, seq: None, truth: None, ts_produce_ms: None }
    }

    #[test]
    fn sends_when_full() {
        let mut b = Batcher::new(2, Duration::from_secs(60), 3);
        b.push(meta(0), |s| {
            s.fill(1.0);
            Ok::<_, ()>(())
        })
        .unwrap();
        assert!(!b.ready());
        b.push(meta(1), |s| {
            s.fill(2.0);
            Ok::<_, ()>(())
        })
        .unwrap();
        assert!(b.ready());
        let batch = b.take();
        assert_eq!(batch.input, vec![1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
        assert_eq!(batch.len(), 2);
        assert!(b.is_empty() && b.time_left().is_none());
    }

    #[test]
    fn sends_when_the_first_frame_waited_long_enough() {
        let mut b = Batcher::new(100, Duration::from_millis(20), 1);
        b.push(meta(0), |_| Ok::<_, ()>(())).unwrap();
        assert!(!b.ready());
        std::thread::sleep(Duration::from_millis(25));
        assert!(b.ready());
    }

    #[test]
    fn a_failed_fill_leaves_no_slot() {
        let mut b = Batcher::new(4, Duration::from_secs(1), 2);
        assert_eq!(b.push(meta(0), |_| Err("bad")), Err("bad"));
        assert!(b.is_empty() && b.time_left().is_none());
        b.push(meta(1), |s| {
            s.fill(5.0);
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(b.take().input, vec![5.0, 5.0]);
    }
}
