"""Where a cluster's node types are read: the node types an autoscaler may launch, as a cluster
launcher mapping (``available_node_types``, ``head_node_type``, ``max_workers``).

- A file the user names (the ``node_types`` config key): a cluster launcher YAML
  (``cluster.yaml``), or a KubeRay ``RayCluster`` or ``RayJob`` manifest, turned into node types
  by the function the KubeRay autoscaler itself uses (Ray's
  ``_derive_autoscaling_config_from_ray_cr``).
- The running autoscaler's own config, where it can be read from this driver:
  the ``--autoscaling-config`` of the autoscaler monitor (v1 or v2) of this cluster when it runs
  on this driver's node (``ray up`` writes it as ``~/ray_bootstrap_config.yaml`` on the head), or,
  in a KubeRay pod (``RAY_CLUSTER_NAME`` and ``RAY_CLUSTER_NAMESPACE`` set by the operator), the
  RayCluster resource read from the Kubernetes API with the pod's credentials, as the KubeRay
  autoscaler sidecar reads it.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

from .schema import ConfigError

MONITORS = ("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")
KUBERAY_NAME_ENV, KUBERAY_NAMESPACE_ENV = "RAY_CLUSTER_NAME", "RAY_CLUSTER_NAMESPACE"  # set by the KubeRay operator
STATIC = "static"  # an autoscaler monitor runs without a config: no autoscaler, the cluster is the nodes up now


@dataclass(frozen=True)
class NodeTypes:
    config: dict[str, Any]  # a cluster launcher mapping
    source: str             # where it was read, for messages


def from_ray_cluster(manifest: dict[str, Any], source: str) -> NodeTypes:
    """The node types the KubeRay autoscaler derives from a RayCluster (or a RayJob's
    ``rayClusterSpec``)."""
    from jsonschema.exceptions import ValidationError
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    kind = manifest.get("kind")
    spec = (manifest.get("spec") or {}).get("rayClusterSpec") if kind == "RayJob" else manifest.get("spec")
    if not isinstance(spec, dict) or "headGroupSpec" not in spec:
        raise ConfigError(f"node_types: {source} has no RayCluster spec (spec{'.rayClusterSpec' if kind == 'RayJob' else ''}"
                          ".headGroupSpec)")
    metadata = {"namespace": "default", **(manifest.get("metadata") or {})}
    metadata.setdefault("name", "raycluster")
    try:
        config = _derive_autoscaling_config_from_ray_cr({"metadata": metadata, "spec": copy.deepcopy(spec)})
    except (KeyError, ValueError, TypeError, ValidationError) as err:  # ValidationError: Ray's cluster schema
        message = getattr(err, "message", None) or (str(err).splitlines()[0] if str(err) else repr(err))
        raise ConfigError(f"node_types: {source}: the KubeRay autoscaler cannot read its groups "
                          f"({type(err).__name__}: {message})") from None
    return NodeTypes(config, source)


def from_mapping(loaded: Any, source: str) -> NodeTypes:
    """Node types from a parsed file: a RayCluster/RayJob manifest or a cluster launcher config."""
    if not isinstance(loaded, dict):
        raise ConfigError(f"node_types: {source} is not a mapping")
    if loaded.get("kind") in ("RayCluster", "RayJob"):
        return from_ray_cluster(loaded, source)
    if not isinstance(loaded.get("available_node_types"), dict):
        raise ConfigError(f"node_types: {source} is neither a cluster launcher config (available_node_types) "
                          "nor a KubeRay RayCluster or RayJob manifest")
    return NodeTypes(loaded, source)


def from_file(path: str, key: str = "node_types") -> NodeTypes:
    """Node types from a cluster.yaml or a RayCluster/RayJob manifest (a path or URI); ``key``
    names where the path came from in one-line errors."""
    import yaml

    from .storage import filesystem, read_text

    try:
        fs, fs_path = filesystem(os.path.expanduser(path))
        loaded = yaml.safe_load(read_text(fs, fs_path))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{key}: cannot read {path} ({type(err).__name__})") from None
    try:
        return from_mapping(loaded, path)
    except ConfigError as err:
        raise ConfigError(str(err).replace("node_types:", f"{key}:", 1)) from None


def differences(declared: NodeTypes, running: NodeTypes) -> str | None:
    """The first worker node type whose resources or most nodes differ between two sets of node
    types (head types are compared by resources only: KubeRay names its head headgroup)."""
    def workers(config):
        head = config.get("head_node_type")
        return {name: ({k: float(v) for k, v in ((spec or {}).get("resources") or {}).items() if k != "memory"},
                       float((spec or {}).get("max_workers", 0)))
                for name, spec in (config.get("available_node_types") or {}).items() if name != head}
    mine, theirs = workers(declared.config), workers(running.config)
    for name in sorted(set(mine) | set(theirs)):
        if mine.get(name) != theirs.get(name):
            def say(entry):
                return "no such type" if entry is None else f"{entry[0]} up to {entry[1]:g}"
            return f"{name}: {say(mine.get(name))} in {declared.source}, {say(theirs.get(name))} in {running.source}"
    return None


# ----------------------------------------------------------------------------- the running autoscaler


def on_this_node(gcs_address: str, node_ip: str) -> NodeTypes | str | None:
    """The running autoscaler's config from its monitor process, where the monitor of
    ``gcs_address`` runs on this machine and on the node ``node_ip`` (this driver's): NodeTypes,
    STATIC when it runs without an autoscaling config, None when no such monitor is seen, or a
    one-line reason (str) when its config file cannot be read from here (another container)."""
    import psutil

    import yaml

    for process in psutil.process_iter(["cmdline"]):
        try:
            args = process.info["cmdline"] or []
        except (psutil.Error, OSError):
            continue
        if not any(m in arg for arg in args for m in MONITORS) or f"--gcs-address={gcs_address}" not in args:
            continue
        flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        monitor_ip = flags.get("monitor-ip") or gcs_address.rsplit(":", 1)[0]
        if node_ip and monitor_ip != node_ip:
            return None  # the head's monitor, seen from another node on the same machine (a test cluster)
        path = flags.get("autoscaling-config")
        if not path:
            return STATIC
        path = os.path.expanduser(path)
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as err:
            return f"the autoscaler's config {path} cannot be read here ({type(err).__name__})"
        return from_mapping(loaded, f"the autoscaler's config {path}")
    return None


def in_kuberay_pod() -> tuple[str, str] | None:
    """(name, namespace) of the RayCluster this pod belongs to, where the KubeRay operator says so."""
    name, namespace = os.environ.get(KUBERAY_NAME_ENV), os.environ.get(KUBERAY_NAMESPACE_ENV)
    return (name, namespace) if name and namespace else None


def from_kubernetes(name: str, namespace: str) -> NodeTypes | str:
    """The RayCluster ``namespace/name`` read from the Kubernetes API with this pod's credentials
    (the operator grants the head's service account ``get`` on it), through the client the
    KubeRay autoscaler uses; a one-line reason (str) where it cannot be read."""
    try:
        from ray.autoscaler._private.kuberay.node_provider import KubernetesHttpApiClient

        manifest = KubernetesHttpApiClient(namespace=namespace).get(f"rayclusters/{name}")
    except Exception as err:  # no credentials, no RBAC, no API server: the caller says so and goes on
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"the RayCluster {namespace}/{name} cannot be read from the Kubernetes API ({reason})"
    return from_ray_cluster(manifest, f"the RayCluster {namespace}/{name}")
