"""Watching a run: a real Prometheus server (Debian's package, on 127.0.0.1) scrapes the suite's
Ray cluster through the files Ray generates for it (its prometheus.yml and the service-discovery
file), and while a short training runs every query of paco_ray's Grafana dashboard returns series
with plausible values; the dashboard's Train page lists the run."""
import json
import shutil
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, run_args
from paco_ray import train as train_cli
from paco_ray.dashboard import panel_queries

pytestmark = pytest.mark.ray
RUN = "monitored"
PLAUSIBLE = {  # metric -> (low, high) of any sample
    "images_per_s": (1e-3, 1e7), "train_loss": (1e-6, 100.0), "lr": (0.0, 1.0), "epoch": (1, 100),
    "queue_fill": (1e-6, 1.0), "val_": (0.0, 100.0), "skipped_steps": (0, 0),
}


@pytest.fixture
def shot_groups_dataset(easy_raw, tmp_path):
    """``easy_raw`` with a head class of 110 images: every shot group (many > 100, few < 20) has a
    class, so every accuracy panel has a series."""
    from pipelines.fashion_mnist import prepare

    return prepare(easy_raw, tmp_path / "groups", imbalance_factor=10, max_per_class=110, val_per_class=10)


@pytest.fixture
def prometheus(ray_cluster, tmp_path):
    """Prometheus started on Ray's own generated config, stopped (and its data removed) after."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (setup.sh installs Debian's package)")
    from paco_ray.monitoring import start_prometheus

    session = Path(ray_cluster._private.worker._global_node.get_session_dir_path())
    config = session / "metrics" / "prometheus" / "prometheus.yml"
    assert "prom_metrics_service_discovery.json" in config.read_text()  # Ray's node discovery, no target typed here
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "prometheus.log", "w")
    server = start_prometheus("prometheus", session, port, tmp_path / "tsdb", log)  # as cluster.yaml's head does
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("prometheus did not become ready: " + (tmp_path / "prometheus.log").read_text()[-2000:])
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def query(url: str, promql: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}), timeout=10) as r:
        return json.load(r)["data"]["result"]


def samples(url: str, expr: str) -> list[float]:
    """Every value the query had over the last 10 minutes, at 2 s steps (the run's gauges end with its workers)."""
    found = query(url, f'({expr.replace("$trial", RUN)})[10m:2s]')
    return [float(v) for series in found for _, v in series["values"]]


def test_prometheus_scrapes_the_run_and_every_dashboard_query_has_plausible_series(prometheus, ray_cluster,
                                                                                   shot_groups_dataset, tmp_path):
    queries = panel_queries()
    assert len(queries) == 11 and all("$trial" in expr for _, expr in queries)
    done = {}
    run = threading.Thread(target=lambda: done.update(code=train_cli.main(
        run_args(shot_groups_dataset, tmp_path, RUN, "--set", "optim.epochs=10", "--set", "keep_checkpoints=1"))))
    run.start()
    seen: dict[str, list[float]] = {}
    deadline = time.time() + 400
    while time.time() < deadline and (run.is_alive() or len(seen) < len(queries)):
        seen = {title: values for title, expr in queries if (values := samples(prometheus, expr))}
        if len(seen) == len(queries) and not run.is_alive():
            break
        time.sleep(3)
    run.join(timeout=600)
    assert done.get("code") == 0
    assert set(seen) == {title for title, _ in queries}, f"no series for {set(t for t, _ in queries) - set(seen)}"
    for title, expr in queries:
        metric = expr.split("ray_paco_", 1)[1].split("{", 1)[0]
        low, high = next(bounds for prefix, bounds in PLAUSIBLE.items() if metric.startswith(prefix))
        assert all(low <= v <= high for v in seen[title]), (title, min(seen[title]), max(seen[title]))
    # one series per worker on the per-worker panel, both workers seen
    per_worker = query(prometheus, f'max_over_time(ray_paco_images_per_s{{trial="{RUN}"}}[10m])')
    assert sorted(s["metric"]["worker"] for s in per_worker) == ["0", "1"]
    # the run is on the dashboard's Train page (Ray Train V2's state tracking)
    dashboard = ray_cluster._private.worker._global_node.address_info["webui_url"]
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(f"http://{dashboard}/api/train/v2/runs/v1",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = json.load(response)
    assert RUN in json.dumps(runs)
