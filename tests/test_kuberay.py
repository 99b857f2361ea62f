"""The KubeRay manifests (deploy/kuberay/), without a Kubernetes cluster: validated against KubeRay's
own CRD schema with the API server's strict field validation (the CRD comes from a KubeRay
checkout found at run time; skipped, saying how, where there is none), turned into node types by
Ray's KubeRay autoscaler code and compared with cluster.yaml, read back from a local HTTPS server
that plays the Kubernetes API, and checked by paco_ray.manifest_check."""
import ast
import copy
import decimal
import http.server
import ipaddress
import json
import os
import re
import shlex
import socket
import ssl
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import pytest
import yaml

from paco_ray import node_types
from paco_ray.capacity import from_autoscaling_config
from paco_ray.manifest_check import check_manifest
from paco_ray.schema import ConfigError
from paco_ray.search_space import load_space
from paco_ray.tune import concurrency, parser as tune_parser, scale_to_cluster

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "kuberay"
CRD_PATHS = {"RayCluster": "ray-operator/config/crd/bases/ray.io_rayclusters.yaml",
             "RayJob": "ray-operator/config/crd/bases/ray.io_rayjobs.yaml"}
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # Ray reads it without a client cert
HEAD_ENTRY = {"NodeID": "h" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.1",  # ray.nodes(): the head, up
              "Resources": {"CPU": 8.0, "memory": 1e10, "node:__internal_head__": 1.0, "node:10.0.0.1": 1.0}}


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def all_documents() -> list[dict]:
    return [d for path in sorted(DEPLOY.glob("*.yaml")) for d in documents(path.name)]


def raycluster() -> dict:
    (doc,) = documents("raycluster.yaml")
    return doc


def groups(manifest: dict) -> list[tuple[str, dict]]:
    """(node type name, group spec): the head as KubeRay's autoscaler names it, then the workers."""
    spec = manifest["spec"]
    return [("headgroup", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


# ----------------------------------------------------------------------------- the CRD schema


def strict(schema: dict) -> dict:
    """A copy of a CRD's structural schema that rejects unknown fields as the API server's strict
    field validation does (every object schema with ``properties`` and neither
    ``x-kubernetes-preserve-unknown-fields`` nor ``additionalProperties``), reads
    ``x-kubernetes-int-or-string`` as an integer or a string, and ``nullable`` as null allowed."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [strict(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    closed = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not closed:
        out["additionalProperties"] = False
    return out


def schema_errors(validator: jsonschema.protocols.Validator, doc: dict) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(doc))


def test_strict_rejects_unknown_fields_and_reads_int_or_string():
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "port": {"x-kubernetes-int-or-string": True}}}
    as_shipped = jsonschema.Draft7Validator(schema)
    checked = jsonschema.Draft7Validator(strict(schema))
    assert checked.is_valid({"name": "dashboard", "port": 8265}) and checked.is_valid({"name": "d", "port": "http"})
    assert as_shipped.is_valid({"name": "dashboard", "prot": 8265})  # the schema itself lets a typo through
    assert schema_errors(checked, {"name": "dashboard", "prot": 8265}) == [
        "(top): Additional properties are not allowed ('prot' was unexpected)"]
    assert not checked.is_valid({"name": "dashboard", "port": 1.5})  # neither an integer nor a string
    assert not checked.is_valid({"name": 7, "port": 1})
    assert "additionalProperties" not in schema  # the CRD's schema is left as it was
    # nested objects are closed too; maps and preserve-unknown-fields stay open
    nested = strict({"type": "object", "properties": {
        "inner": {"type": "object", "properties": {"a": {"type": "string"}}},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "free": {"type": "object", "properties": {"a": {}}, "x-kubernetes-preserve-unknown-fields": True}}})
    checked = jsonschema.Draft7Validator(nested)
    assert checked.is_valid({"inner": {"a": "x"}, "labels": {"any": "x"}, "free": {"a": 1, "b": 2}})
    assert not checked.is_valid({"inner": {"a": "x", "b": "y"}})
    assert not checked.is_valid({"labels": {"any": 1}})


def kuberay_checkout() -> tuple[str, str] | None:
    """$KUBERAY_REPO: ('tree', a clone) or ('git', a bare git directory); None when unset."""
    where = os.environ.get("KUBERAY_REPO")
    if not where:
        return None
    bare = (Path(where) / "HEAD").is_file() and (Path(where) / "objects").is_dir()
    return ("git" if bare else "tree"), where


def git(checkout: tuple[str, str], *args: str) -> str:
    how, where = checkout
    prefix = ["git", "-C", where] if how == "tree" else ["git", f"--git-dir={where}"]
    done = subprocess.run(prefix + list(args), capture_output=True, text=True)
    if done.returncode:
        raise LookupError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"git {args[0]} failed")
    return done.stdout


def operator_release() -> str:
    """The KubeRay operator release the README installs (helm ... kuberay-operator --version X)."""
    found = re.search(r"kuberay/kuberay-operator --version (\d+\.\d+\.\d+)", (REPO / "README.md").read_text())
    assert found, "README: no `helm install ... kuberay/kuberay-operator --version X.Y.Z`"
    return "v" + found[1]


NO_CRD = ("no KubeRay checkout for the CRD schema: set KUBERAY_REPO to a clone (or a bare git directory) of "
          "github.com/ray-project/kuberay (git clone --branch {release} https://github.com/ray-project/kuberay); "
          "the project does not vendor the CRD")


@pytest.fixture(scope="module", params=["HEAD", "release"])
def crd_validators(request):
    """{kind: strict validator} of the v1 CRDs of a KubeRay checkout, at its HEAD and at the
    operator release the README installs, with where they came from."""
    checkout = kuberay_checkout()
    release = operator_release()
    if checkout is None:
        pytest.skip(NO_CRD.format(release=release))
    ref = "HEAD" if request.param == "HEAD" else release
    validators = {}
    for kind, path in CRD_PATHS.items():
        try:
            if checkout[0] == "tree" and ref == "HEAD":
                text = (Path(checkout[1]) / path).read_text()
            else:
                text = git(checkout, "show", f"{ref}:{path}")
        except (OSError, LookupError) as err:
            pytest.skip(f"{checkout[1]} has no {path} at {ref} ({err}); "
                        f"{NO_CRD.format(release=release)}")
        crd = next(d for d in yaml.safe_load_all(text) if d and d.get("kind") == "CustomResourceDefinition")
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        validators[kind] = jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))
    try:
        commit = git(checkout, "rev-parse", f"{ref}^{{commit}}").strip()
    except LookupError:
        commit = "(not a git checkout)"
    return validators, f"KubeRay {ref} {commit[:12]} ({checkout[1]})"


def test_the_shipped_manifests_validate_against_the_kuberay_crd(crd_validators):
    validators, source = crd_validators
    checked = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in documents(path.name):
            if doc.get("kind") in validators:
                assert doc["apiVersion"] == "ray.io/v1", path.name
                assert schema_errors(validators[doc["kind"]], doc) == [], f"{path.name} against {source}"
                checked.append(doc["kind"])
    assert sorted(checked) == ["RayCluster", "RayJob"]


@pytest.mark.parametrize("change, error", [
    (lambda m: m["spec"].__setitem__("workerGroupSpec", m["spec"].pop("workerGroupSpecs")),
     "spec: Additional properties are not allowed ('workerGroupSpec' was unexpected)"),
    (lambda m: m["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 8),
     "spec.headGroupSpec.rayStartParams.num-cpus: 8 is not of type 'string'"),
    (lambda m: m["spec"]["workerGroupSpecs"][1].__setitem__("maxReplicas", "4"),
     "spec.workerGroupSpecs.1.maxReplicas: '4' is not of type 'integer'"),
    (lambda m: ray_container(m["spec"]["workerGroupSpecs"][0]).__setitem__(
        "volumeMount", ray_container(m["spec"]["workerGroupSpecs"][0]).pop("volumeMounts")),
     "spec.workerGroupSpecs.0.template.spec.containers.0: Additional properties are not allowed "
     "('volumeMount' was unexpected)"),
    (lambda m: m["spec"]["authOptions"].__setitem__("mode", "tokens"),
     "spec.authOptions.mode: 'tokens' is not one of ['disabled', 'token']"),
], ids=["typo-workerGroupSpec", "num-cpus-int", "maxReplicas-string", "typo-in-pod-template", "auth-mode"])
def test_the_crd_validation_fails_on_a_typo_or_a_wrong_type(crd_validators, change, error):
    validators, _ = crd_validators
    broken = raycluster()
    change(broken)
    assert schema_errors(validators["RayCluster"], broken) == [error]


def test_the_crd_validation_fails_on_a_typo_in_the_rayjob(crd_validators):
    validators, _ = crd_validators
    (job,) = documents("rayjob-search.yaml")
    job["spec"]["entryPoint"] = job["spec"].pop("entrypoint")
    assert schema_errors(validators["RayJob"], job) == [
        "spec: Additional properties are not allowed ('entryPoint' was unexpected)"]


# ----------------------------------------------------------------------------- node types, without the CRD


SUFFIXES = {"": 1, "m": decimal.Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def whole(quantity) -> int:
    """A Kubernetes quantity ("3500m", "14Gi", "4") rounded up to an integer."""
    number, suffix = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity)).groups()
    return int((decimal.Decimal(number) * SUFFIXES[suffix]).to_integral_value(decimal.ROUND_CEILING))


def expected_node_types(manifest: dict) -> dict[str, tuple[dict, int]]:
    """{name: (resources, max_workers)} from the Ray containers' limits, where the RayCluster
    would place the pods."""
    out = {}
    for name, group in groups(manifest):
        limits = ray_container(group)["resources"]["limits"]
        resources = {"CPU": whole(limits["cpu"]), "memory": whole(limits["memory"])}
        resources["GPU"] = whole(limits.get("nvidia.com/gpu", 0))
        out[name] = (resources, 0 if name == "headgroup" else group["maxReplicas"])
    return out


def test_the_node_types_are_those_kuberays_autoscaler_derives_from_the_container_limits():
    manifest = raycluster()
    types = node_types.from_file(str(DEPLOY / "raycluster.yaml"))
    derived = {name: (spec["resources"], spec["max_workers"])
               for name, spec in types.config["available_node_types"].items()}
    assert derived == expected_node_types(manifest)
    assert list(derived) == ["headgroup", "gpu-small", "gpu-large"] and types.config["head_node_type"] == "headgroup"
    assert derived["gpu-large"] == ({"CPU": 48, "GPU": 4, "memory": 180 * 2**30}, 4)
    assert types.config["max_workers"] == 12 and types.config["idle_timeout_minutes"] == 10
    # the head's explicit rayStartParams say what its container has: 8 CPUs, no GPU
    head = manifest["spec"]["headGroupSpec"]
    assert whole(head["rayStartParams"]["num-cpus"]) == whole(ray_container(head)["resources"]["limits"]["cpu"]) == 8
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in ray_container(head)["resources"]["limits"]


def test_the_rayjob_uses_the_rayclusters_node_types():
    # the shipped RayJob selects the running RayCluster: it carries no node types of its own
    with pytest.raises(ConfigError, match=r"node_types: .*rayjob-search.yaml has no RayCluster spec "
                                          r"\(spec.rayClusterSpec.headGroupSpec\)"):
        node_types.from_file(str(DEPLOY / "rayjob-search.yaml"))
    (job,) = documents("rayjob-search.yaml")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": raycluster()["metadata"]["name"]}
    # a RayJob that brings the same cluster (rayClusterSpec) gives the same node types
    embedded = {**job, "spec": {"entrypoint": job["spec"]["entrypoint"], "rayClusterSpec": raycluster()["spec"]}}
    from_job = node_types.from_mapping(embedded, "a RayJob")
    assert from_job.config["available_node_types"] == node_types.from_file(str(DEPLOY / "raycluster.yaml")).config[
        "available_node_types"]


def test_the_manifest_holds_the_shipped_search_spaces_as_cluster_yaml_does():
    kuberay = from_autoscaling_config(node_types.from_file(str(DEPLOY / "raycluster.yaml")).config, [HEAD_ENTRY])
    launcher = from_autoscaling_config(yaml.safe_load((REPO / "cluster.yaml").read_text()), [HEAD_ENTRY])
    assert kuberay.autoscaling and [k.up for k in kuberay.kinds] == [1, 0, 0]
    imagenet = load_space(REPO / "search_spaces" / "imagenet_lt.yaml")
    assert concurrency(imagenet, kuberay, trials=12) == concurrency(imagenet, launcher, trials=12) == 4
    cifar = load_space(REPO / "search_spaces" / "cifar100_lt.yaml")
    assert concurrency(cifar, kuberay, trials=64) == concurrency(cifar, launcher, trials=64) == 8
    # every shipped space, also with no max_concurrent_trials: as many as fit, the same on both
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        space = load_space(path)
        assert concurrency(space, kuberay, trials=64) == concurrency(space, launcher, trials=64), path.name
        space.max_concurrent_trials = 0
        assert concurrency(space, kuberay, trials=64) == concurrency(space, launcher, trials=64), path.name
    full = imagenet.full_config()
    assert scale_to_cluster(full, kuberay).workers == scale_to_cluster(full, launcher).workers == 24
    # the same refusal, naming KubeRay's groups
    assert kuberay.placement_problem({"CPU": 8, "GPU": 8}, 1).startswith(
        "workers: one worker needs {GPU: 8, CPU: 8} but no node type has that much GPU: headgroup {GPU: 0, CPU: 8}; "
        "gpu-small {GPU: 1, CPU: 4} (up to 8, 0 up); gpu-large {GPU: 4, CPU: 48} (up to 4, 0 up); "
        "at most 12 worker nodes")


def test_the_manifests_and_cluster_yaml_agree():
    launcher = yaml.safe_load((REPO / "cluster.yaml").read_text())
    manifest = raycluster()
    derived = expected_node_types(manifest)
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert {k: derived["headgroup"][0][k] for k in ("CPU", "GPU")} == head["resources"]
    workers = {name.replace("_", "-"): spec for name, spec in launcher["available_node_types"].items()
               if name != launcher["head_node_type"]}
    assert set(workers) == set(derived) - {"headgroup"}
    for name, spec in workers.items():
        assert {k: derived[name][0][k] for k in ("CPU", "GPU")} == spec["resources"], name
        assert derived[name][1] == spec["max_workers"], name
    assert sum(derived[name][1] for name in workers) == launcher["max_workers"]
    spec = manifest["spec"]
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == 60 * launcher["idle_timeout_minutes"]
    for name, group in groups(manifest)[1:]:
        on_spot = group["template"]["spec"].get("nodeSelector", {}).get("eks.amazonaws.com/capacityType") == "SPOT"
        theirs = launcher["available_node_types"][name.replace("-", "_")]
        assert on_spot == (theirs["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"), name
        assert group["minReplicas"] == theirs["min_workers"] == 0
    # one Ray and one paco_ray everywhere: cluster.yaml's image, the Dockerfile's base, the RayCluster's
    import ray
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    base = re.search(r"^FROM (\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)[1]
    assert base == launcher["docker"]["image"] == f"rayproject/ray:{spec['rayVersion']}-py311-gpu"
    assert spec["rayVersion"] == ray.__version__
    images = {c["image"] for _, g in groups(manifest) for c in g["template"]["spec"]["containers"]}
    assert images == {f"paco-ray:{version}"}


def test_the_service_accounts_are_those_the_pods_name():
    accounts = {d["metadata"]["name"]: d["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
                for d in documents("serviceaccounts.yaml")}
    named = {name: g["template"]["spec"]["serviceAccountName"] for name, g in groups(raycluster())}
    assert named == {"headgroup": "paco-ray", "gpu-small": "paco-ray-worker", "gpu-large": "paco-ray-worker"}
    assert {name: arn.rsplit("/", 1)[1] for name, arn in accounts.items()} == {
        "paco-ray": "paco-ray-head", "paco-ray-worker": "paco-ray-worker"}


def test_the_podmonitors_scrape_ports_the_ray_pods_have():
    manifest = raycluster()
    cluster = manifest["metadata"]["name"]
    monitors = documents("podmonitor.yaml")
    assert {m["kind"] for m in monitors} == {"PodMonitor"}
    # KubeRay labels each pod ray.io/cluster=<name>, ray.io/node-type=head|worker
    pods = [({"ray.io/cluster": cluster, "ray.io/node-type": "head" if name == "headgroup" else "worker"}, g)
            for name, g in groups(manifest)]
    scraped = set()
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        selected = [g for labels, g in pods if selector.items() <= labels.items()]
        assert selected, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for group in selected:
                ports = {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}
                assert endpoint["port"] in ports, (monitor["metadata"]["name"], endpoint["port"])
                if endpoint["port"] == "metrics":
                    assert ports["metrics"] == int(group["rayStartParams"]["metrics-export-port"]) == 8080
                scraped.add(id(group))
    assert len(scraped) == len(pods)  # every group is scraped


def test_the_rayjob_entrypoint_runs_the_search_in_the_projects_folder(tmp_path):
    (job,) = documents("rayjob-search.yaml")
    # KubeRay pastes the entrypoint into the submitter's bash line: `ray job submit ... -- <entrypoint> ;`
    words = subprocess.run(["bash", "-c", "printf '%s\\0' " + job["spec"]["entrypoint"]], capture_output=True,
                           text=True, check=True).stdout.split("\0")[:-1]
    assert words[:2] == ["bash", "-c"] and len(words) == 3  # the && stays in the job's own command
    # `ray job submit` joins its arguments (shlex.join) and the job runs them in a shell on the head
    script = shlex.split(shlex.split(shlex.join(words))[2])
    workdir = re.search(r"^WORKDIR (\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)[1]
    assert script[:6] == ["cd", workdir, "&&", "python", "-m", "paco_ray.tune"] and workdir == "/home/ray/paco_ray"
    args = tune_parser().parse_args(script[6:])
    assert args.then_train and not args.resume
    space = load_space(REPO / args.space, args.set)
    assert args.space == "search_spaces/imagenet_lt.yaml"
    assert space.full_config().data.path == "s3://YOUR-BUCKET/datasets/imagenet_lt"
    assert space.storage_path == "s3://YOUR-BUCKET/paco_ray"


def test_the_image_puts_the_projects_venv_first():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "COPY --chown=1000:100 . /home/ray/paco_ray" in dockerfile and "./setup.sh --runtime" in dockerfile
    assert re.search(r"^ENV PATH=/home/ray/paco_ray/\.venv/bin:\$PATH$", dockerfile, re.M)
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)


# ----------------------------------------------------------------------------- the Kubernetes API


def certificates(folder: Path) -> dict[str, Path]:
    """A self-signed CA, a server certificate for 127.0.0.1 and a client certificate it issued."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(timezone.utc)

    def issue(subject, key, issuer, issuer_key, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
                   .not_valid_after(now + timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    paths = {}

    def write(stem, cert, key=None):
        paths[stem] = folder / f"{stem}.crt"
        paths[stem].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            paths[f"{stem}_key"] = folder / f"{stem}.key"
            paths[f"{stem}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue(name("test kubernetes ca"), ca_key, name("test kubernetes ca"), ca_key,
               [(x509.BasicConstraints(ca=True, path_length=0), True),
                (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                               key_encipherment=False, data_encipherment=False, key_agreement=False,
                               encipher_only=False, decipher_only=False), True)])
    write("ca", ca)
    for stem, cn, usage, alt in (("server", "kube-apiserver", ExtendedKeyUsageOID.SERVER_AUTH,
                                  [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                 ("client", "system:serviceaccount:paco:paco-ray", ExtendedKeyUsageOID.CLIENT_AUTH,
                                  None)):
        key = ec.generate_private_key(ec.SECP256R1())
        extensions = [(x509.BasicConstraints(ca=False, path_length=None), True),
                      (x509.ExtendedKeyUsage([usage]), False)]
        if alt:
            extensions.append((x509.SubjectAlternativeName(alt), False))
        write(stem, issue(name(cn), key, ca.subject, ca_key, extensions), key)
    return paths


@pytest.fixture
def api_server(tmp_path):
    """A local HTTPS server that answers the RayCluster GET of the Kubernetes API (mutual TLS):
    paco/paco-ray is the shipped manifest as the API server returns it, paco/forbidden a 403."""
    certs = certificates(tmp_path)
    served = {**raycluster(), "metadata": {**raycluster()["metadata"], "namespace": "paco", "resourceVersion": "4711",
                                           "uid": "0b5e3c6e-0000-4000-8000-000000000000"}, "status": {"state": "ready"}}
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            client = dict(x[0] for x in self.connection.getpeercert()["subject"])["commonName"]
            seen.append((self.path, client, self.headers.get("Authorization")))
            if self.path == "/apis/ray.io/v1/namespaces/paco/rayclusters/paco-ray":
                self.answer(200, served)
            elif self.path == "/apis/ray.io/v1/namespaces/paco/rayclusters/forbidden":
                self.answer(403, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                                  "code": 403, "message": 'rayclusters.ray.io "forbidden" is forbidden: User '
                                  '"system:serviceaccount:paco:paco-ray" cannot get resource "rayclusters"'})
            else:
                self.answer(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404})

        def answer(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["server"], certs["server_key"])
    context.verify_mode = ssl.CERT_REQUIRED  # the client must show a certificate of the CA
    context.load_verify_locations(certs["ca"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], certs, seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


READ_IN_A_POD = """
import json
from paco_ray import node_types
name, namespace = node_types.in_kuberay_pod()
found = node_types.from_kubernetes(name, namespace)
denied = node_types.from_kubernetes("forbidden", namespace)
print(json.dumps({"config": found.config, "source": found.source, "denied": denied}))
"""


def test_the_raycluster_is_read_from_the_kubernetes_api_as_from_the_file(api_server):
    port, certs, seen = api_server
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_") and "proxy" not in k.lower()}
    # what a KubeRay pod has (Ray reads the API server's address at import time: a fresh interpreter)
    env.update(KUBERNETES_SERVICE_HOST="127.0.0.1", KUBERNETES_SERVICE_PORT_HTTPS=str(port),
               RAY_KUBERAY_CA_CERT_PATH=str(certs["ca"]), RAY_KUBERAY_CLIENT_CERT_PATH=str(certs["client"]),
               RAY_KUBERAY_CLIENT_KEY_PATH=str(certs["client_key"]), RAY_CLUSTER_NAME="paco-ray",
               RAY_CLUSTER_NAMESPACE="paco", KUBERAY_REQUEST_TIMEOUT_S="30")
    done = subprocess.run([sys.executable, "-c", READ_IN_A_POD], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    read = json.loads(done.stdout.strip().splitlines()[-1])
    from_file = node_types.from_file(str(DEPLOY / "raycluster.yaml")).config
    assert read["config"]["available_node_types"] == from_file["available_node_types"]
    assert {k: read["config"][k] for k in ("head_node_type", "max_workers", "cluster_name")} == {
        k: from_file[k] for k in ("head_node_type", "max_workers", "cluster_name")}
    assert read["config"]["provider"]["namespace"] == "paco" and read["source"] == "the RayCluster paco/paco-ray"
    denied = read["denied"]
    assert isinstance(denied, str) and "\n" not in denied
    assert denied.startswith("the RayCluster paco/forbidden cannot be read from the Kubernetes API (403 Client Error: "
                             "Forbidden for url: https://127.0.0.1:")
    # both requests went to the RayCluster's path, with the client certificate (no token file here)
    assert [(path, client) for path, client, _ in seen] == [
        ("/apis/ray.io/v1/namespaces/paco/rayclusters/paco-ray", "system:serviceaccount:paco:paco-ray"),
        ("/apis/ray.io/v1/namespaces/paco/rayclusters/forbidden", "system:serviceaccount:paco:paco-ray")]


@pytest.mark.parametrize("case", ["no-token", "no-server"])
def test_an_unreadable_api_gives_a_one_line_reason(tmp_path, case):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_") and "proxy" not in k.lower()}
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env.update(KUBERNETES_SERVICE_HOST="127.0.0.1", KUBERNETES_SERVICE_PORT_HTTPS=str(port),
               KUBERAY_REQUEST_TIMEOUT_S="5")
    if case == "no-token" and Path(IN_CLUSTER_TOKEN).exists():
        pytest.skip(f"this machine is a Kubernetes pod ({IN_CLUSTER_TOKEN} exists)")
    if case == "no-server":  # credentials, but no API server
        certs = certificates(tmp_path)
        env.update(RAY_KUBERAY_CA_CERT_PATH=str(certs["ca"]), RAY_KUBERAY_CLIENT_CERT_PATH=str(certs["client"]),
                   RAY_KUBERAY_CLIENT_KEY_PATH=str(certs["client_key"]))
    code = "from paco_ray import node_types; print(repr(node_types.from_kubernetes('paco-ray', 'paco')))"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    reason = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert isinstance(reason, str) and "\n" not in reason
    assert reason.startswith("the RayCluster paco/paco-ray cannot be read from the Kubernetes API (")
    if case == "no-token":  # a pod without its service account token (and no client certificate)
        assert IN_CLUSTER_TOKEN in reason
    else:
        assert f"port={port}" in reason and "Connection refused" in reason


# ----------------------------------------------------------------------------- manifest_check


def test_the_shipped_manifests_pass_the_manifest_check():
    assert check_manifest(all_documents()) == []


def worker(docs: list[dict], name: str) -> dict:
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    return next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == name)


def stage_volume_as_pvc(docs):
    pod = worker(docs, "gpu-small")["template"]["spec"]
    pod.pop("securityContext")
    stage = next(v for v in pod["volumes"] if v["name"] == "stage")
    stage.pop("emptyDir")
    stage["ephemeral"] = {"volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"],
                                                          "resources": {"requests": {"storage": "50Gi"}}}}}


def no_cpu_anywhere(docs):
    head = next(d for d in docs if d["kind"] == "RayCluster")["spec"]["headGroupSpec"]
    del head["rayStartParams"]["num-cpus"]
    resources = ray_container(head)["resources"]
    del resources["limits"]["cpu"], resources["requests"]["cpu"]


PROBLEMS = {
    "autoscaling-off": (lambda docs: next(d for d in docs if d["kind"] == "RayCluster")["spec"].__setitem__(
        "enableInTreeAutoscaling", False),
        "RayCluster paco-ray: enableInTreeAutoscaling is false, not true: without Ray's autoscaler the GPU groups "
        "stay at their replicas and no trial gets a GPU"),
    "gpu-min-replicas": (lambda docs: worker(docs, "gpu-large").__setitem__("minReplicas", 1),
                         "RayCluster paco-ray: workerGroupSpecs[gpu-large].minReplicas is 1: a GPU group starts from "
                         "zero pods (minReplicas: 0) and the autoscaler adds them when a run asks"),
    "stage-not-mounted": (lambda docs: ray_container(worker(docs, "gpu-small"))["volumeMounts"].pop(1),
                          "RayCluster paco-ray: workerGroupSpecs[gpu-small]: PACO_RAY_STAGE_DIR=/mnt/stage/paco_ray is "
                          "on no volumeMount of container ray-worker: not writable (the image's filesystem there is "
                          "root's; mount the stage volume at or above it)"),
    "stage-read-only": (lambda docs: ray_container(worker(docs, "gpu-large"))["volumeMounts"][1].__setitem__(
        "readOnly", True),
        "RayCluster paco-ray: workerGroupSpecs[gpu-large]: PACO_RAY_STAGE_DIR=/mnt/stage/paco_ray is on the read-only "
        "volumeMount /mnt/stage (stage): not writable"),
    "stage-root-owned": (stage_volume_as_pvc,
                         "RayCluster paco-ray: workerGroupSpecs[gpu-small]: the stage volume stage (ephemeral) at "
                         "/mnt/stage is root-owned and the pod sets no securityContext.fsGroup: the image's ray user "
                         "(uid 1000) cannot write it (fsGroup: 100)"),
    "worker-no-credentials": (lambda docs: worker(docs, "gpu-large")["template"]["spec"].__setitem__(
        "serviceAccountName", "default"),
        "RayCluster paco-ray: workerGroupSpecs[gpu-large]: no bucket credentials (serviceAccountName default is no "
        "ServiceAccount among these documents with eks.amazonaws.com/role-arn, and container ray-worker has no "
        "envFrom secretRef or AWS_ACCESS_KEY_ID env)"),
    "head-no-credentials": (lambda docs: next(d for d in docs if d["kind"] == "RayCluster")["spec"]["headGroupSpec"][
        "template"]["spec"].pop("serviceAccountName"),
        "RayCluster paco-ray: headGroupSpec: no bucket credentials (no serviceAccountName with an IAM role, and "
        "container ray-head has no envFrom secretRef or AWS_ACCESS_KEY_ID env)"),
    "ray-cannot-convert": (lambda docs: worker(docs, "gpu-small").pop("maxReplicas"),
                           "RayCluster paco-ray: the KubeRay autoscaler cannot read its groups (KeyError: "
                           "'maxReplicas')"),
    "ray-no-cpu": (no_cpu_anywhere,
                   "RayCluster paco-ray: the KubeRay autoscaler cannot read its groups (ValueError: Autoscaler "
                   "failed to detect `CPU` resources for group headgroup.)"),
    "ray-schema": (lambda docs: worker(docs, "gpu-small").__setitem__("maxReplicas", 4.5),
                   "RayCluster paco-ray: the KubeRay autoscaler cannot read its groups (ValidationError: 8.5 is not "
                   "of type 'integer')"),
}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_each_problem_gives_exactly_its_line(problem):
    change, line = PROBLEMS[problem]
    docs = all_documents()
    change(docs)
    assert check_manifest(docs) == [line]


def test_what_the_manifest_check_accepts_instead():
    docs = all_documents()
    # an emptyDir is world-writable: no fsGroup needed; a PVC with fsGroup is group-owned by it
    worker(docs, "gpu-small")["template"]["spec"].pop("securityContext")
    assert check_manifest(docs) == []
    docs = all_documents()
    stage_volume_as_pvc(docs)
    worker(docs, "gpu-small")["template"]["spec"]["securityContext"] = {"fsGroup": 100}
    assert check_manifest(docs) == []
    # keys from a Secret instead of IRSA, on every Ray container
    docs = [d for d in all_documents() if d["kind"] != "ServiceAccount"]
    assert len(check_manifest(docs)) == 3  # head and both worker groups
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    for _, group in groups(cluster)[:2]:
        ray_container(group)["envFrom"] = [{"secretRef": {"name": "paco-ray-s3"}}]
    ray_container(groups(cluster)[2][1])["env"].append(
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "paco-ray-s3", "key": "id"}}})
    assert check_manifest(docs) == []


def test_a_rayjob_that_brings_its_cluster_is_checked_too():
    (job,) = documents("rayjob-search.yaml")
    spec = copy.deepcopy(raycluster()["spec"])
    spec["workerGroupSpecs"][0]["minReplicas"] = 2
    job["spec"] = {"entrypoint": job["spec"]["entrypoint"], "rayClusterSpec": spec}
    assert check_manifest(documents("serviceaccounts.yaml") + [job]) == [
        "RayJob paco-ray-search-imagenet-lt (rayClusterSpec): workerGroupSpecs[gpu-small].minReplicas is 2: a GPU "
        "group starts from zero pods (minReplicas: 0) and the autoscaler adds them when a run asks"]


def test_cluster_check_reads_the_manifests_with_their_service_accounts():
    def run(*files):
        return subprocess.run([sys.executable, "-m", "paco_ray.cluster_check", *files], cwd=REPO, capture_output=True,
                              text=True, timeout=120)

    both = run("deploy/kuberay/raycluster.yaml", "deploy/kuberay/serviceaccounts.yaml")
    assert both.returncode == 0 and both.stdout.strip().endswith("fit for kubectl apply"), both.stderr
    alone = run("deploy/kuberay/raycluster.yaml")  # without the accounts, no pod has bucket credentials
    lines = alone.stderr.strip().splitlines()
    assert alone.returncode == 2 and len(lines) == 3 and all("no bucket credentials" in line for line in lines), lines
