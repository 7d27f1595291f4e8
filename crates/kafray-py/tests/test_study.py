"""The batch study on Ray (task per file) and Spark (partitions), with its records and charts."""
from kafray import study


def test_batch_study_on_ray_and_spark_records_every_file(ray_cluster, tmp_path):
    out = tmp_path / "out"
    code = study.main(["--files", "40", "--per-file", "5", "--nodes", "2", "--partitions", "4",
                       "--address", ray_cluster, "--out", str(out)])
    assert code == 0
    tasks = study.read_csv(out / "tasks.csv")
    runs = study.read_csv(out / "runs.csv")
    assert [(r["engine"], r["nodes"]) for r in runs] == [("ray", "1"), ("ray", "2"), ("spark", "1"), ("spark", "2")]
    for run in runs:
        mine = [t for t in tasks if (t["engine"], t["nodes"]) == (run["engine"], run["nodes"])]
        assert len(mine) == 40 and len({t["file"] for t in mine}) == 40, "one result per file"
        assert all(t["error"] == "" and t["images"] == "5" for t in mine)
        assert all(0 <= float(t["start_s"]) <= float(t["end_s"]) <= float(run["wall_s"]) + 0.5 for t in mine)
        assert float(run["accuracy"]) >= 0.95, run
        # The paper's Fig. 6 parts: each measured, and reading plus evaluating fit in the wall time.
        assert float(run["launch_s"]) > 0 and float(run["read_s"]) > 0 and float(run["evaluate_s"]) > 0, run
        assert float(run["read_s"]) + float(run["evaluate_s"]) <= float(run["wall_s"]) + 0.05, run
        assert all(float(t["read_s"]) + float(t["evaluate_s"]) <= float(t["end_s"]) - float(t["start_s"]) + 1e-3
                   for t in mine)
        used = {t["node"] for t in mine}
        assert len(used) == int(run["nodes"]), f"{run['engine']} on {run['nodes']} node(s) ran on {used}"
    ray2 = [t for t in tasks if (t["engine"], t["nodes"]) == ("ray", "2")]
    assert [t["node"] for t in ray2[:4]] == ["node-1", "node-2", "node-1", "node-2"], "round-robin"
    assert float(runs[0]["ship_s"]) > 0 and float(runs[2]["ship_s"]) == 0, "Ray ships the files, Spark reads them"
    for chart in ("timeline.png", "total_time.png", "breakdown.png"):
        data = (out / chart).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, chart
