"""Builds deploy/grafana/kafray.json, the kafray dashboard, with Grafana's own dashboard model
(grafana-foundation-sdk, generated from Grafana's schemas): run it after changing a panel.

    .venv/bin/python deploy/grafana/dashboard.py            # rewrites kafray.json
    .venv/bin/python deploy/grafana/dashboard.py --check    # fails if kafray.json is stale

Every query reads the metrics kafray serves (a worker's /metrics and the Ray controller's), and
cluster-wide percentiles come from the workers' histogram buckets summed before the quantile.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUT = Path(__file__).with_name("kafray.json")
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
WINDOW = "1m"

# (title, unit, [(PromQL, legend)]), in reading order: what comes in, how fast, how late, how much.
PANELS = [
    ("Throughput", "reqps", [
        (f"sum(rate(kafray_frames_predicted_total[{WINDOW}]))", "predicted"),
        (f"sum(rate(kafray_frames_consumed_total[{WINDOW}]))", "consumed"),
    ]),
    ("Latency, produce to acknowledged prediction", "s", [
        (f"histogram_quantile(0.5, sum by (le) (rate(kafray_latency_seconds_bucket[{WINDOW}])))", "p50"),
        (f"histogram_quantile(0.99, sum by (le) (rate(kafray_latency_seconds_bucket[{WINDOW}])))", "p99"),
    ]),
    ("Consumer lag (frames behind the log end)", "short", [
        ("sum(kafray_consumer_lag)", "total"),
        ("sum by (worker) (kafray_consumer_lag)", "{{worker}}"),
    ]),
    ("Workers", "short", [
        ("count(kafray_assigned_partitions)", "serving /metrics"),
        ("sum(kafray_deployment_workers)", "in the deployment"),
        ("sum(kafray_autoscale_desired_workers)", "desired by the autoscaler"),
    ]),
    ("Batch size", "short", [
        (f"sum(rate(kafray_batch_size_sum[{WINDOW}])) / sum(rate(kafray_batch_size_count[{WINDOW}]))", "mean"),
        ("max(kafray_batch_limit)", "limit (largest)"),
    ]),
    ("Dead letters by reason", "reqps", [
        (f"sum by (reason) (rate(kafray_frames_dead_lettered_total[{WINDOW}]))", "{{reason}}"),
    ]),
    ("Where the time goes, p99 per stage", "s", [
        (f"histogram_quantile(0.99, sum by (le, stage) (rate(kafray_stage_seconds_bucket[{WINDOW}])))", "{{stage}}"),
    ]),
    ("Trouble: restarts, delivery failures, consumer errors", "short", [
        ("sum(increase(kafray_restarts_total[10m]))", "restarts (10 min)"),
        ("sum(increase(kafray_delivery_failures_total[10m]))", "delivery failures (10 min)"),
        ("sum(increase(kafray_consumer_errors_total[10m]))", "consumer errors (10 min)"),
    ]),
]

# (title, unit, PromQL): the numbers at a glance, above the charts.
STATS = [
    ("Predicted / s", "reqps", f"sum(rate(kafray_frames_predicted_total[{WINDOW}]))"),
    ("p99 latency", "s", f"histogram_quantile(0.99, sum by (le) (rate(kafray_latency_seconds_bucket[{WINDOW}])))"),
    ("Lag", "short", "sum(kafray_consumer_lag)"),
    ("Workers", "short", "count(kafray_assigned_partitions)"),
]


def queries() -> list[str]:
    """Every PromQL expression of the dashboard (the tests run each on a real Prometheus)."""
    return [q for _, _, targets in PANELS for q, _ in targets] + [q for _, _, q in STATS]


def build() -> dict:
    board = (dashboard.Dashboard("kafray")
             .uid("kafray")
             .description("kafray workers: throughput, latency, lag, workers, batches, dead letters")
             .tags(["kafray", "kafka", "ray"])
             .refresh("10s")
             .time("now-30m", "now")
             .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")))
    for title, unit, expr in STATS:
        board = board.with_panel(stat.Panel().title(title).unit(unit).datasource(DATASOURCE).span(6).height(4)
                                 .with_target(prometheus.Dataquery().expr(expr).ref_id("A")))
    for title, unit, targets in PANELS:
        panel = timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).span(12).height(8)
        for i, (expr, legend) in enumerate(targets):
            panel = panel.with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id("ABCDEFGH"[i]))
        board = board.with_panel(panel)
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        if OUT.read_text() != render():
            sys.exit(f"{OUT} is stale: run `.venv/bin/python {Path(__file__).relative_to(Path.cwd())}`")
    else:
        OUT.write_text(render())
        print(f"wrote {OUT}")
