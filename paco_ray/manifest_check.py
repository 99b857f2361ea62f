"""Offline checks of KubeRay manifests for paco_ray (deploy/kuberay/): what lets a RayCluster start
and then never train, one line per problem naming the group and the key.

- Ray's own conversion of the groups into node types fails (node_types.from_ray_cluster);
- ``enableInTreeAutoscaling`` is off: the GPU groups, which start at zero pods, never grow;
- a GPU group has ``minReplicas`` > 0: GPU pods are held while nothing runs;
- ``PACO_RAY_STAGE_DIR`` is on no volumeMount of the Ray container (or a read-only one): the
  image's filesystem there is root's, so staging a dataset fails;
- the stage volume is root-owned and the pod sets no ``securityContext.fsGroup`` (nor runs as
  root): a PVC or ephemeral volume, which the image's ``ray`` user (uid 1000, gid 100) cannot
  write. An emptyDir is world-writable and passes; a hostPath is as the node made it, which no
  manifest shows, and is not judged;
- a group has no bucket credentials: neither a ``serviceAccountName`` whose ServiceAccount among
  the documents carries an IAM role annotation (IRSA, or GKE's workload identity), nor an
  ``envFrom`` secretRef or AWS key env on its Ray container.

A RayJob is checked where it carries its own cluster (``spec.rayClusterSpec``); one that selects a
running RayCluster (``clusterSelector``) is judged with that RayCluster's manifest.
"""
from __future__ import annotations

import json
import posixpath
from typing import Any

from .schema import ConfigError

STAGE_ENV = "PACO_RAY_STAGE_DIR"
ROLE_ANNOTATIONS = ("eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account")
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
WORLD_WRITABLE = ("emptyDir",)         # kubelet creates it with mode 0777
NOT_JUDGED = ("hostPath",)             # its owner is whatever the node made
READ_ONLY = ("configMap", "secret", "downwardAPI", "projected")


def check_manifest(documents: list[dict]) -> list[str]:
    """The problems of the RayClusters (and RayJobs with a rayClusterSpec) among ``documents``
    (parsed YAML documents, ServiceAccounts included), one line each; empty when there are none."""
    docs = [d for d in documents if isinstance(d, dict)]
    accounts = {(d.get("metadata") or {}).get("name"): (d.get("metadata") or {}).get("annotations") or {}
                for d in docs if d.get("kind") == "ServiceAccount"}
    problems: list[str] = []
    for doc in docs:
        name = (doc.get("metadata") or {}).get("name", "?")
        if doc.get("kind") == "RayCluster":
            problems += _check_cluster(doc, doc.get("spec"), f"RayCluster {name}", accounts)
        elif doc.get("kind") == "RayJob" and isinstance((doc.get("spec") or {}).get("rayClusterSpec"), dict):
            problems += _check_cluster(doc, doc["spec"]["rayClusterSpec"], f"RayJob {name} (rayClusterSpec)", accounts)
    return problems


def _check_cluster(doc: dict, spec: Any, where: str, accounts: dict[str, dict]) -> list[str]:
    from .node_types import from_ray_cluster

    try:
        from_ray_cluster(doc, where)
    except ConfigError as err:
        return [str(err).removeprefix("node_types: ")]
    problems = []
    if spec.get("enableInTreeAutoscaling") is not True:
        value = json.dumps(spec["enableInTreeAutoscaling"]) if "enableInTreeAutoscaling" in spec else "not set"
        problems.append(f"{where}: enableInTreeAutoscaling is {value}, not true: without Ray's autoscaler the GPU "
                        "groups stay at their replicas and no trial gets a GPU")
    groups = [("headGroupSpec", spec.get("headGroupSpec") or {})]
    groups += [(f"workerGroupSpecs[{g.get('groupName', i)}]", g)
               for i, g in enumerate(spec.get("workerGroupSpecs") or []) if isinstance(g, dict)]
    for key, group in groups:
        pod = (group.get("template") or {}).get("spec") or {}
        container = (pod.get("containers") or [{}])[0]
        if key != "headGroupSpec" and _gpus(group, container) and (group.get("minReplicas") or 0) > 0:
            problems.append(f"{where}: {key}.minReplicas is {group['minReplicas']}: a GPU group starts from zero "
                            "pods (minReplicas: 0) and the autoscaler adds them when a run asks")
        problems += _stage_problems(f"{where}: {key}", pod, container)
        if not _has_credentials(pod, container, accounts):
            account = pod.get("serviceAccountName")
            said = (f"serviceAccountName {account} is no ServiceAccount among these documents with "
                    f"{ROLE_ANNOTATIONS[0]}" if account else "no serviceAccountName with an IAM role")
            problems.append(f"{where}: {key}: no bucket credentials ({said}, and container "
                            f"{container.get('name', '?')} has no envFrom secretRef or AWS_ACCESS_KEY_ID env)")
    return problems


def _gpus(group: dict, container: dict) -> bool:
    """Whether the group's pods have GPUs (Ray's rule: a ``*gpu`` limit or request, or num-gpus)."""
    resources = container.get("resources") or {}
    amounts = [v for part in ("limits", "requests")
               for k, v in (resources.get(part) or {}).items() if k.endswith("gpu")]
    amounts.append((group.get("rayStartParams") or {}).get("num-gpus", 0))
    return any(_positive(v) for v in amounts)


def _positive(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


def _stage_problems(where: str, pod: dict, container: dict) -> list[str]:
    """Why the Ray container cannot write its PACO_RAY_STAGE_DIR, if it sets one."""
    stage = next((e.get("value") for e in container.get("env") or [] if e.get("name") == STAGE_ENV), None)
    if not stage:
        return []
    stage = posixpath.normpath(stage)
    mounts = [m for m in container.get("volumeMounts") or []
              if m.get("mountPath") and _under(stage, posixpath.normpath(m["mountPath"]))]
    if not mounts:
        return [f"{where}: {STAGE_ENV}={stage} is on no volumeMount of container {container.get('name', '?')}: not "
                "writable (the image's filesystem there is root's; mount the stage volume at or above it)"]
    mount = max(mounts, key=lambda m: len(posixpath.normpath(m["mountPath"])))  # the innermost one holds it
    volume = next((v for v in pod.get("volumes") or [] if v.get("name") == mount.get("name")), {})
    source = next((k for k in volume if k != "name"), "?")
    if mount.get("readOnly") or source in READ_ONLY:
        return [f"{where}: {STAGE_ENV}={stage} is on the read-only volumeMount {mount['mountPath']} "
                f"({mount.get('name')}): not writable"]
    if source in WORLD_WRITABLE or source in NOT_JUDGED:
        return []
    security = pod.get("securityContext") or {}
    as_root = 0 in ((container.get("securityContext") or {}).get("runAsUser"), security.get("runAsUser"))
    if security.get("fsGroup") is None and not as_root:
        return [f"{where}: the stage volume {mount.get('name')} ({source}) at {mount['mountPath']} is root-owned and "
                "the pod sets no securityContext.fsGroup: the image's ray user (uid 1000) cannot write it "
                "(fsGroup: 100)"]
    return []


def _under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def _has_credentials(pod: dict, container: dict, accounts: dict[str, dict]) -> bool:
    annotations = accounts.get(pod.get("serviceAccountName") or pod.get("serviceAccount")) or {}
    if any(annotations.get(a) for a in ROLE_ANNOTATIONS):
        return True
    if any("secretRef" in source for source in container.get("envFrom") or []):
        return True
    return any(e.get("name") in CREDENTIAL_ENV for e in container.get("env") or [])
