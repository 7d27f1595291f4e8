//! The prediction record: the public output contract (see the README's "Message formats").
use serde::{Deserialize, Serialize, Serializer};

/// One entry of `top`: `[class, label, score]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TopEntry(pub usize, pub Option<String>, pub f32);

impl Serialize for TopEntry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.0, &self.1, self.2).serialize(s)
    }
}

/// Value of a record on the predictions topic (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The frame's key (source id).
    pub source: Option<String>,
    /// `kafray.seq` of the frame, when given.
    pub seq: Option<u64>,
    /// Where the frame was on the input topic: together they identify it.
    pub partition: i32,
    pub offset: i64,
    /// Index of the top class.
    pub class: usize,
    /// Name of the top class, when the model has a label file.
    pub label: Option<String>,
    /// Probability of the top class.
    pub score: f32,
    pub top: Vec<TopEntry>,
    pub model: String,
    pub worker: String,
    /// Size of the micro-batch this frame was classified in.
    pub batch_size: usize,
    /// Record timestamp of the frame (capture/produce time), ms since the epoch.
    pub ts_produce_ms: Option<i64>,
    /// When the prediction was made, ms since the epoch.
    pub ts_done_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_to_the_documented_shape() {
        let p = Prediction {
            source: Some("cam-1".into()),
            seq: Some(7),
            partition: 2,
            offset: 40,
            class: 285,
            label: Some("Egyptian cat".into()),
            score: 0.5,
            top: vec![TopEntry(285, Some("Egyptian cat".into()), 0.5)],
            model: "mobilenet_v2_imagenet".into(),
            worker: "w1".into(),
            batch_size: 10,
            ts_produce_ms: Some(1),
            ts_done_ms: 2,
        };
        let v: serde_json::Value = serde_json::to_value(&p).unwrap();
        assert_eq!(v["top"], serde_json::json!([[285, "Egyptian cat", 0.5]]));
        assert_eq!(v["class"], 285);
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in [
            "source",
            "seq",
            "partition",
            "offset",
            "class",
            "label",
            "score",
            "top",
            "model",
            "worker",
            "batch_size",
            "ts_produce_ms",
            "ts_done_ms",
        ] {
            assert!(keys.contains(&k), "missing {k}");
        }
        let back: Prediction = serde_json::from_value(v).unwrap();
        assert_eq!(back, p);
    }
}
