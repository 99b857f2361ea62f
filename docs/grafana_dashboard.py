"""Write paco_ray/grafana/paco_ray.json, the Grafana dashboard of a paco_ray run (the project's
``ray_paco_*`` gauges, paco_ray.telemetry.GAUGES), built with Grafana's own typed builder
(grafana-foundation-sdk), so the JSON's structure is Grafana's.

python docs/grafana_dashboard.py            # rewrite the dashboard
python docs/grafana_dashboard.py --check    # exit 1 when the committed file is out of date
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "paco_ray" / "grafana" / "paco_ray.json"
TRIAL = 'trial=~"$trial"'

# (title, description, PromQL, legend, Grafana unit); every gauge is tagged trial and worker
PANELS = [
    ("Training images/s per worker", "images each worker trained per second in its last epoch",
     f"ray_paco_images_per_s{{{TRIAL}}}", "{{trial}} worker {{worker}}", "short"),
    ("Training images/s per run", "the run's throughput: the sum over its workers",
     f"sum by (trial) (ray_paco_images_per_s{{{TRIAL}}})", "{{trial}}", "short"),
    ("Training loss", "mean training loss of the last epoch (averaged over the workers)",
     f"max by (trial) (ray_paco_train_loss{{{TRIAL}}})", "{{trial}}", "none"),
    ("Learning rate", "at the end of the last epoch (warmup, then cosine or steps)",
     f"max by (trial) (ray_paco_lr{{{TRIAL}}})", "{{trial}}", "none"),
    ("Epoch", "last finished epoch", f"max by (trial) (ray_paco_epoch{{{TRIAL}}})", "{{trial}}", "none"),
    ("Queue fill", "share of PaCo's key queue holding keys (1 once K keys went in)",
     f"max by (trial) (ray_paco_queue_fill{{{TRIAL}}})", "{{trial}}", "percentunit"),
    ("Validation balanced accuracy", "mean per-class accuracy on the validation split: what runs are selected by",
     f"max by (trial) (ray_paco_val_balanced_acc{{{TRIAL}}})", "{{trial}}", "percent"),
    ("Validation many-shot accuracy", "classes with more training images than the many threshold",
     f"max by (trial) (ray_paco_val_many{{{TRIAL}}})", "{{trial}}", "percent"),
    ("Validation medium-shot accuracy", "classes between the few and many thresholds",
     f"max by (trial) (ray_paco_val_medium{{{TRIAL}}})", "{{trial}}", "percent"),
    ("Validation few-shot accuracy", "classes with fewer training images than the few threshold",
     f"max by (trial) (ray_paco_val_few{{{TRIAL}}})", "{{trial}}", "percent"),
    ("Skipped steps", "steps of the last epoch skipped for a non-finite loss or gradient (skip_nonfinite)",
     f"max by (trial) (ray_paco_skipped_steps{{{TRIAL}}})", "{{trial}}", "none"),
]


def build() -> dict:
    from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, QueryVariable, Row
    from grafana_foundation_sdk.builders.prometheus import Dataquery
    from grafana_foundation_sdk.builders.timeseries import Panel
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

    source = DataSourceRef(type_val="prometheus", uid="${datasource}")
    dashboard = (
        Dashboard("paco_ray").uid("paco-ray").tags(["paco_ray", "ray"]).refresh("30s").time("now-6h", "now")
        .description("A paco_ray run or search: throughput, loss, learning rate, queue and validation shot groups, "
                     "per trial (Tune trial id, or the run name) and worker")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(QueryVariable("trial").label("Trial").datasource(source)
                       .query("label_values(ray_paco_epoch, trial)").multi(True).include_all(True)
                       .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED))
        .with_row(Row("Training"))
    )
    for i, (title, text, expr, legend, unit) in enumerate(PANELS):
        if i == 6:
            dashboard = dashboard.with_row(Row("Validation"))
        dashboard = dashboard.with_panel(
            Panel().title(title).description(text).datasource(source).unit(unit).span(12 if i < 2 else 8).height(8)
            .with_target(Dataquery().expr(expr).legend_format(legend).ref_id("A").datasource(source)))
    return json.loads(JSONEncoder(sort_keys=True, indent=2).encode(dashboard.build()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = json.dumps(build(), indent=2, sort_keys=True) + "\n"
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: python docs/grafana_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(OUTPUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
