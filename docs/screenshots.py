"""Screenshots of the Ray dashboard of a running paco_ray job, taken in headless Chromium, into
docs/screenshots/: the Jobs page and the job with its driver's log, once the job's Train run
(Ray Train V2's state tracking) is running. Ray 2.60's dashboard UI has no page for Train V2
runs; their state is served at /api/train/v2/runs/v1 (tests/test_monitoring.py reads it).

python docs/screenshots.py [--out docs/screenshots]

It starts a local Ray head of its own (token authentication on, dashboard on 127.0.0.1), prepares
a small Fashion-MNIST-like dataset, submits ``paco_ray.train`` as a Ray job, takes the pictures
while it trains, and stops everything. Needs Debian's chromium and chromium-driver, and the docs
extra (pip install -e '.[docs]': selenium).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RAY = str(Path(sys.executable).parent / "ray")
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1440,1000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(url: str, token: str):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def wait_for(predicate, timeout: float, what: str):
    import urllib.error

    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            value = predicate()
        except urllib.error.HTTPError as err:  # the dashboard answers 500 until the run's state exists
            value, last = None, err
        if value:
            return value
        time.sleep(1)
    raise SystemExit(f"error: timed out waiting for {what}" + (f" (last answer: {last})" if last else ""))


def browser(dashboard: str, token: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.get(dashboard)
    driver.add_cookie({"name": "ray-authentication-token", "value": token, "path": "/"})  # what /api/authenticate sets
    return driver


def sign_in(driver, token: str) -> None:
    """Give the dashboard's token dialog the cluster's token, when it asks for one."""
    from selenium.webdriver.common.by import By

    fields = driver.find_elements(By.CSS_SELECTOR, "input[placeholder*='authentication token']")
    if fields:
        fields[0].send_keys(token)
        driver.find_element(By.XPATH, "//button[normalize-space()='Submit' or normalize-space()='SUBMIT']").click()
        time.sleep(3)


def shoot(driver, url: str, path: Path, token: str, settle_s: float = 6.0) -> None:
    driver.get(url)
    time.sleep(settle_s)  # the dashboard renders client-side and polls its APIs
    sign_in(driver, token)
    driver.save_screenshot(str(path))
    print(path)


def take(dashboard: str, token: str, job_id: str, out: Path) -> None:
    wait_for(lambda: any(r.get("status") == "RUNNING" for r in rest(f"{dashboard}/api/train/v2/runs/v1", token)
                         .get("train_runs", [])), 180, "the Train run to be running")
    driver = browser(dashboard, token)
    try:
        shoot(driver, f"{dashboard}/#/jobs", out / "jobs.png", token)
        shoot(driver, f"{dashboard}/#/jobs/{job_id}", out / "job_logs.png", token, settle_s=10)
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from gpu_check import make_dataset

    temp = Path(tempfile.mkdtemp(prefix="prshot", dir="/tmp"))
    data = make_dataset(temp / "data")
    home, gcs, port = temp / "home", free_port(), free_port()
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    token = (home / ".ray" / "auth_token").read_text().strip()
    dashboard = f"http://127.0.0.1:{port}"
    try:
        subprocess.run([RAY, "start", "--head", f"--port={gcs}", f"--temp-dir={temp}/ray", "--num-cpus=2",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={port}", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=180)
        submitted = subprocess.run(
            [RAY, "job", "submit", "--address", dashboard, "--no-wait", "--submission-id", "paco-train-demo", "--",
             sys.executable, "-m", "paco_ray.train", "--workers", "2", "--set", "cpus_per_worker=1",
             "--set", f"data.path={data}", "--set", "data.loader=torch", "--set", "optim.epochs=12",
             "--set", f"storage_path={temp / 'runs'}", "--set", "name=fashion-demo", "--set", "progress_every_s=2"],
            env=env, check=True, capture_output=True, text=True, timeout=120)
        print(submitted.stdout.strip().splitlines()[-1] if submitted.stdout.strip() else "submitted")
        take(dashboard, token, "paco-train-demo", out)
    finally:
        stop_cluster([str(temp), f":{gcs}"])
    return 0


def stop_cluster(markers: list[str]) -> None:
    """Stop this script's Ray processes only (`ray stop` would stop every Ray on the machine)."""
    import psutil

    found = [p for p in psutil.process_iter(["cmdline"]) if any(m in " ".join(p.info["cmdline"] or []) for m in markers)]
    for process in found:
        process.terminate()
    _, alive = psutil.wait_procs(found, timeout=15)
    for process in alive:
        process.kill()


if __name__ == "__main__":
    sys.exit(main())
