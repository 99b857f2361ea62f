"""Prometheus and Grafana for the Ray dashboard's Metrics view, on a cluster's head, bound to
127.0.0.1 and configured from the files Ray generates in its session folder:

    python -m paco_ray.monitoring start --prometheus ~/monitoring/prometheus/prometheus \\
        --grafana-home ~/monitoring/grafana

Prometheus reads Ray's ``metrics/prometheus/prometheus.yml`` (its targets come from Ray's node
service-discovery file, so nodes the autoscaler adds are scraped); Grafana reads Ray's
``grafana.ini`` and provisioning (Ray's dashboards, and paco_ray's, installed beside them by
``paco_ray.dashboard``), with an admin password generated once into a file only its owner reads.
Start Ray first with RAY_PROMETHEUS_HOST, RAY_GRAFANA_HOST and RAY_GRAFANA_IFRAME_HOST set to
these addresses (cluster.yaml does). Both run in sessions of their own and outlive this command.
"""
from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
from pathlib import Path

from .dashboard import install

PROMETHEUS_PORT, GRAFANA_PORT = 9090, 3000


def session_dir(temp_dir: str = "/tmp/ray") -> Path:
    """The latest Ray session's folder on this node."""
    return (Path(temp_dir) / "session_latest").resolve()


def start_prometheus(binary: str, session: Path, port: int = PROMETHEUS_PORT, data: Path | None = None,
                     log=None) -> subprocess.Popen:
    """Prometheus on 127.0.0.1:``port`` with the config Ray generated for ``session``."""
    config = session / "metrics" / "prometheus" / "prometheus.yml"
    if not config.is_file():
        raise SystemExit(f"error: {config} does not exist: start Ray (with its dashboard) first")
    data = data or Path.home() / "prometheus-data"
    return subprocess.Popen([binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
                             f"--storage.tsdb.path={data}"], stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)


def admin_password_file(path: Path) -> Path:
    """A random Grafana admin password in ``path`` (0600), made once."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    return path


def start_grafana(home: Path, session: Path, port: int = GRAFANA_PORT, password: Path | None = None,
                  log=None) -> subprocess.Popen:
    """Grafana on 127.0.0.1:``port`` with Ray's grafana.ini and provisioning for ``session``."""
    grafana = session / "metrics" / "grafana"
    password = admin_password_file(password or Path.home() / ".grafana_admin_password")
    env = {**os.environ, "GF_SERVER_HTTP_ADDR": "127.0.0.1", "GF_SERVER_HTTP_PORT": str(port),
           "GF_PATHS_PROVISIONING": str(grafana / "provisioning"), "GF_SECURITY_ADMIN_PASSWORD__FILE": str(password)}
    return subprocess.Popen([str(home / "bin" / "grafana"), "server", "--homepath", str(home),
                             "--config", str(grafana / "grafana.ini")], env=env, stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paco_ray.monitoring", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("start",))
    parser.add_argument("--prometheus", required=True, help="the prometheus binary")
    parser.add_argument("--grafana-home", help="an unpacked Grafana release (bin/grafana); omit to start none")
    parser.add_argument("--temp-dir", default="/tmp/ray", help="Ray's --temp-dir")
    args = parser.parse_args(argv)
    session = session_dir(args.temp_dir)
    print(f"paco_ray dashboard: {install(session / 'metrics' / 'grafana' / 'dashboards')}")
    prometheus = start_prometheus(args.prometheus, session)
    print(f"prometheus: pid {prometheus.pid}, http://127.0.0.1:{PROMETHEUS_PORT}")
    if args.grafana_home:
        grafana = start_grafana(Path(args.grafana_home).expanduser(), session)
        print(f"grafana: pid {grafana.pid}, http://127.0.0.1:{GRAFANA_PORT} (admin password in "
              f"{Path.home() / '.grafana_admin_password'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
