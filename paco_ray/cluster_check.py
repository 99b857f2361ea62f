"""Check a cluster launcher file before ``ray up``, offline: Ray's own schema (its
``prepare_config`` and ``validate_config``), then what the schema cannot know about a paco_ray
cluster: that rsync copies the code (its excludes must not drop a package directory such as
``paco_ray/data/``), that every ``ImageId`` is a form EC2 accepts, and that worker nodes can reach
the bucket (Ray gives its default instance profile to the head only).

    python -m paco_ray.cluster_check cluster.yaml [--no-bucket]
"""
from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# What must reach the nodes (the code) and what must not (data, results, environments).
SYNCED_DIRS = ("paco_ray", "pipelines", "configs", "search_spaces")
NEVER_SYNCED = re.compile(r"(^|/)(\.venv|runs|\.git)(/|$)|^data/|\.(beton|parquet)$")
IMAGE_ID = re.compile(r"^(ami-[0-9a-f]{8,17}|resolve:ssm:/\S+)$")


def schema_problem(config: dict[str, Any]) -> str | None:
    """Ray's own offline validation of a cluster config (typos, types), as ``ray up`` runs it."""
    import logging

    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # its INFO lines are about defaults it fills
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as err:  # jsonschema's and Ray's own errors
        return f"Ray's cluster schema: {str(err).splitlines()[0]}"
    return None


def rsync_args(config: dict[str, Any]) -> list[str]:
    """The filter arguments Ray's command runner gives rsync for this config."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    options = {"rsync_exclude": config.get("rsync_exclude"), "rsync_filter": config.get("rsync_filter")}
    return SSHCommandRunner._create_rsync_filter_args(None, options)


def synced_files(config: dict[str, Any], source: Path) -> set[str]:
    """The files under ``source`` that ``ray up`` would copy (rsync with the config's filters, dry run)."""
    if shutil.which("rsync") is None:
        raise RuntimeError("rsync is not installed (the cluster launcher copies files with it)")
    done = subprocess.run(["rsync", "-a", "--dry-run", "--out-format=%n", *rsync_args(config),
                           f"{source}/", "/nonexistent-paco-ray-target/"], capture_output=True, text=True, check=True)
    return {line for line in done.stdout.splitlines() if line and not line.endswith("/")}


def sync_problems(config: dict[str, Any], source: Path) -> list[str]:
    """Package files rsync would leave behind, and data or environments it would copy."""
    synced = synced_files(config, source)
    present = {str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()}
    missing = sorted(f for f in present - synced if f.split("/", 1)[0] in SYNCED_DIRS and "__pycache__" not in f)
    extra = sorted(f for f in synced if NEVER_SYNCED.search(f))
    found = []
    if missing:
        found.append(f"rsync_exclude: {len(missing)} code files would not reach the nodes (e.g. {missing[0]}); "
                     "anchor the patterns with a leading / (rsync drops every directory matching an unanchored name)")
    if extra:
        found.append(f"rsync_exclude: {len(extra)} data or environment files would be copied (e.g. {extra[0]})")
    return found


def node_problems(config: dict[str, Any], bucket: bool) -> list[str]:
    """ImageIds EC2 accepts; with results and data in a bucket, an instance profile on every worker type."""
    found = []
    types = config.get("available_node_types") or {}
    aws = (config.get("provider") or {}).get("type") == "aws"
    for name, spec in types.items():
        node_config = (spec or {}).get("node_config") or {}
        image = node_config.get("ImageId")
        if aws and image is not None and not IMAGE_ID.match(str(image)):
            found.append(f"available_node_types.{name}.node_config.ImageId: {image!r} is neither an AMI id nor "
                         "resolve:ssm:<parameter> (EC2 rejects it; Ray passes it on unchanged)")
        if aws and bucket and name != config.get("head_node_type") and "IamInstanceProfile" not in node_config:
            found.append(f"available_node_types.{name}.node_config: no IamInstanceProfile; Ray gives its default "
                         "profile to the head only, so this type's nodes cannot stage data from or write results to "
                         "the bucket")
    return found


def check(config: dict[str, Any], source: Path, bucket: bool = True) -> list[str]:
    """Every problem found, one line each (empty: the file is fit for ``ray up``)."""
    found = [p for p in [schema_problem(config)] if p]
    return found + sync_problems(config, source) + node_problems(config, bucket)


def main(argv: list[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(prog="python -m paco_ray.cluster_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cluster", help="cluster launcher YAML (cluster.yaml)")
    parser.add_argument("--source", default=".", help="the directory `ray up` copies (default: the working directory)")
    parser.add_argument("--no-bucket", action="store_true", help="data and results are not in object storage")
    args = parser.parse_args(argv)
    try:
        config = yaml.safe_load(Path(args.cluster).read_text())
    except (OSError, yaml.YAMLError) as err:
        print(f"error: {args.cluster}: {type(err).__name__}: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    found = check(config, Path(args.source).resolve(), bucket=not args.no_bucket)
    for problem in found:
        print(f"error: {problem}", file=sys.stderr)
    if not found:
        print(f"{args.cluster}: fit for ray up")
    return 2 if found else 0


if __name__ == "__main__":
    sys.exit(main())
