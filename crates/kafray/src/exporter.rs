//! The worker's metrics for Prometheus: `kafray_*` families in the OpenMetrics text format,
//! served at `http://<metrics_addr>/metrics`. Counters and gauges are read from [`Metrics`] at
//! each scrape; histograms are recorded as frames pass ([`crate::metrics::Histograms`]).
//! Names follow Prometheus' conventions: a `kafray_` prefix, the unit in the name, `_total`
//! on counters (the encoder adds it), `_seconds` on times.
use crate::error::{Error, Result};
use crate::metrics::{DeadLetterReason, Metrics, WorkerState};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Reads the worker's counters and gauges at each scrape.
#[derive(Debug)]
struct Live(Arc<Metrics>);

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    ConstCounter::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let m = &self.0;
        let e = &mut encoder;
        counter(e, "kafray_frames_consumed", "Frames polled from the input topic.", m.consumed.load(Relaxed))?;
        counter(e, "kafray_frames_predicted", "Predictions acknowledged by the broker.", m.predicted.load(Relaxed))?;
        {
            let mut family = e.encode_descriptor(
                "kafray_frames_dead_lettered",
                "Frames whose dead letter the broker acknowledged, by reason class.",
                None,
                MetricType::Counter,
            )?;
            for reason in DeadLetterReason::ALL {
                let value = m.dead_lettered_by[reason as usize].load(Relaxed);
                ConstCounter::new(value).encode(family.encode_family(&[("reason", reason.as_str())])?)?;
            }
        }
        let counters = [
            (
                "kafray_dead_letter_fallbacks",
                "Dead letters published without the frame's value (too large to republish).",
                &m.dead_letter_fallbacks,
            ),
            ("kafray_consumer_errors", "Errors the consumer reported instead of a frame.", &m.consume_errors),
            (
                "kafray_restarts",
                "Times the worker started again with new clients after undelivered results.",
                &m.restarts,
            ),
            ("kafray_delivery_failures", "Results whose delivery failed for good.", &m.delivery_failures),
            (
                "kafray_backpressure_pauses",
                "Times polling waited because max_in_flight frames were in flight (backpressure).",
                &m.backpressure_pauses,
            ),
            ("kafray_rebalances", "Rebalances that changed this worker's partitions.", &m.rebalances),
            ("kafray_batches", "Batches given to the model.", &m.batches),
            (
                "kafray_partition_stalled",
                "Times an owned partition was found stalled: no progress for stall_after_s (frames waiting for a result, or left unread).",
                &m.partition_stalls,
            ),
        ];
        for (name, help, value) in counters {
            counter(e, name, help, value.load(Relaxed))?;
        }
        gauge(
            e,
            "kafray_frames_in_flight",
            "Frames polled and not yet acknowledged.",
            m.in_flight.load(Relaxed) as i64,
        )?;
        gauge(
            e,
            "kafray_batch_limit",
            "The batching policy's current batch limit.",
            m.batch_limit.load(Relaxed) as i64,
        )?;
        gauge(
            e,
            "kafray_assigned_partitions",
            "Input partitions this worker owns.",
            m.assigned_partitions.load(Relaxed) as i64,
        )?;
        gauge(
            e,
            "kafray_partitions_stalled",
            "Owned partitions stalled now.",
            m.stalled_partitions.lock().unwrap().len() as i64,
        )?;
        {
            let state = m.health.lock().unwrap().state;
            let mut family = e.encode_descriptor(
                "kafray_worker_state",
                "1 for the state the worker is in (starting, ready, degraded, draining, failed, stopped), else 0.",
                None,
                MetricType::Gauge,
            )?;
            for s in WorkerState::ALL {
                ConstGauge::new(i64::from(s == state)).encode(family.encode_family(&[("state", s.as_str())])?)?;
            }
        }
        let lags = m.partition_lag.lock().unwrap().clone();
        let mut family = e.encode_descriptor(
            "kafray_consumer_lag",
            "Frames behind the log end per assigned input partition (librdkafka statistics).",
            None,
            MetricType::Gauge,
        )?;
        for (partition, lag) in lags {
            ConstGauge::new(lag).encode(family.encode_family(&[("partition", partition.to_string())])?)?;
        }
        Ok(())
    }
}

/// A registry with every `kafray_*` family of one worker, each sample labelled with `labels`
/// (the worker's id, say).
pub fn registry(metrics: Arc<Metrics>, labels: Vec<(String, String)>) -> Registry {
    let labels = labels.into_iter().map(|(k, v)| (k.into(), v.into()));
    let mut registry = Registry::with_labels(labels);
    let h = &metrics.histograms;
    registry.register_with_unit(
        "kafray_latency",
        "Record timestamp (capture) to the prediction acknowledged by the broker.",
        Unit::Seconds,
        h.latency_seconds.clone(),
    );
    registry.register_with_unit(
        "kafray_stage",
        "Each part of a prediction's path: fetch (to the poll), decode, queue, infer, ack.",
        Unit::Seconds,
        h.stage_seconds.clone(),
    );
    registry.register("kafray_batch_size", "Frames per batch given to the model.", h.batch_size.clone());
    registry.register_collector(Box::new(Live(metrics)));
    registry
}

/// Serves `/metrics` and the probes on its own thread until dropped.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The address it listens on (the port chosen when 0 was asked).
    pub addr: String,
}

/// A probe's answer: 200 or 503, with the state and its reason as a line of JSON.
fn probe(metrics: &Metrics, ok: impl Fn(WorkerState, bool) -> bool) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let health = metrics.health();
    let stalled = metrics.stalled_partitions.lock().unwrap().clone();
    let passed = ok(health.state, !stalled.is_empty());
    let body = serde_json::json!({
        "state": health.state.as_str(),
        "reason": health.reason,
        "stalled_partitions": stalled,
        "for_s": health.since.elapsed().as_secs(),
    });
    tiny_http::Response::from_string(format!("{body}\n"))
        .with_status_code(if passed { 200 } else { 503 })
        .with_header("Content-Type: application/json".parse::<tiny_http::Header>().expect("a valid header"))
}

impl MetricsServer {
    /// Listens on `addr` (`host:port`; port 0 picks a free one). Besides `/metrics` it answers
    /// the Kubernetes-style probes from `metrics`' health: `/healthz` (liveness: 200 unless the
    /// worker failed or a partition is stalled) and `/readyz` (readiness: 200 once the model is
    /// warm and the worker is a member of its group, 503 while starting, draining or stopped).
    pub fn start(addr: &str, registry: Registry, metrics: Arc<Metrics>) -> Result<Self> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| Error::Config(format!("--metrics-addr {addr}: cannot listen there: {e}")))?;
        let bound = server.server_addr().to_ip().map_or_else(|| addr.to_string(), |a| a.to_string());
        let server = Arc::new(server);
        let serving = server.clone();
        let thread = std::thread::Builder::new()
            .name("kafray-metrics".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    let path = request.url().split('?').next().unwrap_or_default().to_string();
                    let response = match (request.method(), path.as_str()) {
                        (tiny_http::Method::Get, "/metrics") => {
                            let mut body = String::new();
                            match prometheus_client::encoding::text::encode(&mut body, &registry) {
                                Ok(()) => tiny_http::Response::from_string(body).with_header(
                                    "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"
                                        .parse::<tiny_http::Header>()
                                        .expect("a valid header"),
                                ),
                                Err(e) => tiny_http::Response::from_string(format!("encoding failed: {e}"))
                                    .with_status_code(500),
                            }
                        }
                        (tiny_http::Method::Get, "/healthz") => {
                            probe(&metrics, |state, stalled| state.live() && !stalled)
                        }
                        (tiny_http::Method::Get, "/readyz") => probe(&metrics, |state, _| state.ready()),
                        _ => tiny_http::Response::from_string(
                            "kafray: metrics are at /metrics, probes at /healthz and /readyz\n",
                        )
                        .with_status_code(404),
                    };
                    let _ = request.respond(response);
                }
            })
            .map_err(|e| Error::io("start the metrics thread", e))?;
        Ok(MetricsServer { server, thread: Some(thread), addr: bound })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_follow_the_conventions() {
        let m = Arc::new(Metrics::new());
        m.consumed.fetch_add(3, Relaxed);
        m.dead_lettered_by[DeadLetterReason::ModelFailed as usize].fetch_add(1, Relaxed);
        *m.partition_lag.lock().unwrap() = vec![(0, 5), (1, 7)];
        m.record_latency(12);
        m.histograms.batch_size.observe(4.0);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry(m, vec![("worker".into(), "w1".into())]))
            .unwrap();
        for line in [
            "kafray_frames_consumed_total{worker=\"w1\"} 3",
            "kafray_frames_dead_lettered_total{worker=\"w1\",reason=\"model_failed\"} 1",
            "kafray_consumer_lag{worker=\"w1\",partition=\"1\"} 7",
            "# TYPE kafray_latency_seconds histogram",
            "kafray_latency_seconds_count{worker=\"w1\"} 1",
            "kafray_batch_size_sum{worker=\"w1\"} 4.0",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
