"""paco_ray's Grafana dashboard: generated with Grafana's own builder (grafana-foundation-sdk)
and committed as generated, a panel for every gauge the workers export, a trial variable, and its
place beside Ray's dashboards."""
import json
import subprocess
import sys
from pathlib import Path

from paco_ray.dashboard import DASHBOARD, FILE_NAME, install, panel_queries
from paco_ray.telemetry import GAUGES

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_dashboard_is_what_grafanas_builder_generates():
    done = subprocess.run([sys.executable, "docs/grafana_dashboard.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def test_every_gauge_has_a_panel_per_trial_with_a_unit_and_a_title():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [expr for _, expr in panel_queries(dashboard)]
    assert {name for name, _ in GAUGES.values()} - {"paco_val_top1"} <= \
        {e.split("ray_", 1)[1].split("{", 1)[0] for e in exprs}  # top-1 equals balanced on balanced splits
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["trial"]["query"] == "label_values(ray_paco_epoch, trial)" and variables["trial"]["multi"]
    assert variables["datasource"]["type"] == "datasource"
    panels = [p for p in dashboard["panels"] if p["type"] == "timeseries"]
    assert all(p["title"] and p["description"] and p["fieldConfig"]["defaults"]["unit"] for p in panels)
    assert all('trial=~"$trial"' in t["expr"] for p in panels for t in p["targets"])
    assert dashboard["uid"] == "paco-ray"


def test_install_puts_it_next_to_rays_dashboards(tmp_path):
    folder = tmp_path / "metrics" / "grafana" / "dashboards"
    folder.mkdir(parents=True)
    target = install(folder)
    assert target == folder / FILE_NAME and target.read_text() == DASHBOARD.read_text()
