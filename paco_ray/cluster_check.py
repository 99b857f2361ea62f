"""Check a cluster launcher file before ``ray up``, offline: Ray's own schema (its
``prepare_config`` and ``validate_config``), then what the schema cannot know about a paco_ray
cluster: that rsync copies the code (its excludes must not drop a package directory such as
``paco_ray/data/``), that every ``ImageId`` is a form EC2 accepts, pinned to one SSM parameter
version and the same on every node type, that the instance profiles are those of the IAM template
(``deploy/aws/iam.yaml``: the head may pass the workers' role and nothing else, the workers get the
bucket only), and that each worker's stage directory is a writable host mount. ``--pin-images``
asks SSM for the current version of each ``resolve:ssm:`` ImageId and writes it into the file.
KubeRay manifests are checked by paco_ray.manifest_check (the stage volume, the bucket
credentials, GPU groups from zero, Ray's own reading of the groups).

    python -m paco_ray.cluster_check cluster.yaml [--no-bucket] [--iam deploy/aws/iam.yaml]
    python -m paco_ray.cluster_check cluster.yaml --pin-images [--update]
    python -m paco_ray.cluster_check deploy/kuberay/raycluster.yaml deploy/kuberay/serviceaccounts.yaml
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .storage import filesystem, write_text

# What must reach the nodes (the code) and what must not (data, results, environments).
SYNCED_DIRS = ("paco_ray", "pipelines", "configs", "search_spaces")
NEVER_SYNCED = re.compile(r"(^|/)(\.venv|runs|\.git)(/|$)|^data/|\.(beton|parquet)$")
IMAGE_ID = re.compile(r"^(ami-[0-9a-f]{8,17}|resolve:ssm:/\S+)$")
SSM_IMAGE = re.compile(r"^resolve:ssm:(?P<name>[^:\s]+)(?::(?P<suffix>\S+))?$")  # suffix: a version or a label
PINNED = re.compile(r"^resolve:ssm:[^:\s]+:\d+$")
# an `ImageId: resolve:ssm:...` line of the file's text (an anchor and a comment may stand around the value)
IMAGE_LINE = re.compile(r"""^(?P<key>[ \t]*(?:-[ \t]+)?ImageId:[ \t]+(?:&\S+[ \t]+)?)(?P<q>["']?)"""
                        r"""(?P<value>resolve:ssm:(?P<name>[^\s"':#]+)(?::(?P<suffix>[^\s"'#]+))?)(?P=q)"""
                        r"""(?=[ \t]*(?:\#|\r?$))""", re.M)
RAY_DEFAULT_PROFILE = "ray-autoscaler-v1"  # what Ray creates for a head that names no profile: EC2 and S3 full access
DEFAULT_IAM = "deploy/aws/iam.yaml"


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


def is_aws(config: dict[str, Any]) -> bool:
    return (config.get("provider") or {}).get("type") == "aws"


def node_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """available_node_types, each spec a dict."""
    return {name: spec or {} for name, spec in (config.get("available_node_types") or {}).items()}


def worker_types(config: dict[str, Any]) -> list[str]:
    return [name for name in node_types(config) if name != config.get("head_node_type")]


def node_problems(config: dict[str, Any], bucket: bool) -> list[str]:
    """ImageIds EC2 accepts; with results and data in a bucket, an instance profile on every worker type."""
    found = []
    if not is_aws(config):
        return found
    for name, spec in node_types(config).items():
        node_config = spec.get("node_config") or {}
        image = node_config.get("ImageId")
        if image is not None and not IMAGE_ID.match(str(image)):
            found.append(f"available_node_types.{name}.node_config.ImageId: {image!r} is neither an AMI id nor "
                         "resolve:ssm:<parameter> (EC2 rejects it; Ray passes it on unchanged)")
        if bucket and name != config.get("head_node_type") and "IamInstanceProfile" not in node_config:
            found.append(f"available_node_types.{name}.node_config: no IamInstanceProfile; Ray gives its default "
                         "profile to the head only, so this type's nodes cannot stage data from or write results to "
                         "the bucket")
    return found


def image_problems(config: dict[str, Any], cluster_file: str = "cluster.yaml") -> list[str]:
    """ImageIds not pinned to an SSM parameter version (one line per value), and worker types whose
    ImageId is not the head's."""
    if not is_aws(config):
        return []
    images = {name: (spec.get("node_config") or {}).get("ImageId") for name, spec in node_types(config).items()}
    unpinned: dict[str, list[str]] = {}
    for name, image in images.items():
        if isinstance(image, str) and SSM_IMAGE.match(image) and not PINNED.match(image):
            unpinned.setdefault(image, []).append(name)
    found = []
    for image, names in unpinned.items():
        also = f" (and {', '.join(names[1:])})" if len(names) > 1 else ""
        found.append(f"available_node_types.{names[0]}.node_config.ImageId{also}: {image!r} is not pinned to a "
                     "version of its SSM parameter, so nodes launched later may boot another AMI; run "
                     f"`python -m paco_ray.cluster_check {cluster_file} --pin-images`")
    head = config.get("head_node_type")
    if head in images:
        for name in worker_types(config):
            if images[name] != images[head]:
                found.append(f"available_node_types.{name}.node_config.ImageId: {images[name]!r} is not the head's "
                             f"({images[head]!r}), so these workers would drift from the head's image; write it once "
                             "(`ImageId: &image ...` on the head, `ImageId: *image` on the workers)")
    return found


# --- the IAM template (CloudFormation, long-form functions) -------------------------------------

def listify(value: Any) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def cfn_text(expr: Any) -> str | None:
    """A CloudFormation string expression as text, its references written ``${Name}`` (``Ref``) or
    ``${Name.Attr}`` (``Fn::GetAtt``); None for a form this does not read."""
    if isinstance(expr, str):
        return expr
    if isinstance(expr, dict) and len(expr) == 1:
        ((fn, arg),) = expr.items()
        if fn == "Ref" and isinstance(arg, str):
            return "${%s}" % arg
        if fn == "Fn::GetAtt":
            return "${%s}" % (".".join(map(str, arg)) if isinstance(arg, list) else arg)
        if fn == "Fn::Sub":
            return arg if isinstance(arg, str) else cfn_text(arg[0]) if isinstance(arg, list) and arg else None
        if fn == "Fn::Join" and isinstance(arg, list) and len(arg) == 2:
            parts = [cfn_text(p) for p in listify(arg[1])]
            return None if None in parts else str(arg[0]).join(parts)
    return None


def ref_target(expr: Any) -> str | None:
    """The logical id an expression is exactly a ``Ref`` to."""
    match = re.fullmatch(r"\$\{([A-Za-z0-9]+)\}", cfn_text(expr) or "")
    return match.group(1) if match else None


def resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    """The template's resources of one type: logical id -> Properties."""
    return {logical: (res.get("Properties") or {}) for logical, res in (template.get("Resources") or {}).items()
            if isinstance(res, dict) and res.get("Type") == kind}


def instance_profiles(template: dict[str, Any]) -> dict[str, str | None]:
    """InstanceProfileName -> the logical id of its role (None: none the template defines)."""
    roles = resources(template, "AWS::IAM::Role")
    found = {}
    for props in resources(template, "AWS::IAM::InstanceProfile").values():
        name = cfn_text(props.get("InstanceProfileName"))
        if name:
            role = next((r for r in map(ref_target, listify(props.get("Roles"))) if r in roles), None)
            found[name] = role
    return found


def role_name(template: dict[str, Any], role: str) -> str:
    return cfn_text(resources(template, "AWS::IAM::Role")[role].get("RoleName")) or role


def role_statements(template: dict[str, Any], role: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The policy statements a role of the template gets (inline, the template's managed policies and
    policies naming the role), and the managed policies it attaches from outside the template."""
    props = resources(template, "AWS::IAM::Role")[role]
    managed = resources(template, "AWS::IAM::ManagedPolicy")
    documents = [p.get("PolicyDocument") for p in listify(props.get("Policies")) if isinstance(p, dict)]
    outside = []
    for arn in listify(props.get("ManagedPolicyArns")):
        target = ref_target(arn)
        if target in managed:
            documents.append(managed[target].get("PolicyDocument"))
        else:
            outside.append(cfn_text(arn) or repr(arn))
    for kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
        for policy in resources(template, kind).values():
            if role in map(ref_target, listify(policy.get("Roles"))):
                documents.append(policy.get("PolicyDocument"))
    statements = [s for d in documents if isinstance(d, dict) for s in listify(d.get("Statement"))
                  if isinstance(s, dict) and s.get("Effect") == "Allow"]
    return statements, outside


def allows(statement: dict[str, Any], action: str) -> bool:
    """Whether an Allow statement's Action (or NotAction) covers ``action`` (IAM wildcards, any case)."""
    if "NotAction" in statement:
        return not any(fnmatch.fnmatchcase(action.lower(), str(a).lower()) for a in listify(statement["NotAction"]))
    return any(fnmatch.fnmatchcase(action.lower(), str(a).lower()) for a in listify(statement.get("Action")))


def profile_name(node_config: dict[str, Any]) -> str | None:
    """The instance profile a node_config names (by Name, or the last part of its Arn)."""
    profile = node_config.get("IamInstanceProfile")
    if not isinstance(profile, dict):
        return None
    return profile.get("Name") or (str(profile["Arn"]).rsplit("/", 1)[-1] if profile.get("Arn") else None)


def passrole_problems(template: dict[str, Any], iam: str, head_role: str, worker_roles: dict[str, str]) -> list[str]:
    """The head's role must pass each worker profile's role (``worker_roles``: profile -> role) and
    no role at large."""
    statements = [s for s in role_statements(template, head_role)[0] if allows(s, "iam:PassRole")]
    targets = [cfn_text(r) for s in statements for r in listify(s.get("Resource"))]
    wide = [t for t in targets if t is None or "*" in t]
    wide += ["NotResource"] if any("NotResource" in s for s in statements) else []
    if wide:
        return [f"{iam}: Resources.{head_role}: iam:PassRole on {wide[0]!r}: the head could hand any role it "
                "matches (an admin one too) to an instance it starts; name the worker role's ARN only"]
    found = []
    for profile, role in worker_roles.items():
        name = role_name(template, role)
        if not any(t == "${%s.Arn}" % role or t.endswith(f":role/{name}") or t.endswith(f"/{name}") and ":role/" in t
                   for t in targets):
            found.append(f"{iam}: no PassRole: the head's role {role_name(template, head_role)} cannot pass "
                         f"{profile}'s role to EC2; every worker launch would fail (UnauthorizedOperation)")
    return found


BUCKET_ARN = re.compile(r"arn:(\$\{AWS::Partition\}|aws[a-z-]*):s3:::\$\{Bucket\}(/.*)?")


def worker_role_problems(template: dict[str, Any], iam: str, role: str, users: list[str]) -> list[str]:
    """A worker role gets S3 on the Bucket parameter's bucket and nothing of EC2 or IAM."""
    statements, outside = role_statements(template, role)
    who = f"Resources.{role} ({role_name(template, role)}, the role of {', '.join(users)})"
    found = [f"{iam}: {who}: attaches {arn}, which this check cannot read; a worker role gets the bucket only"
             for arn in outside]
    granted = [str(a) for s in statements for a in listify(s.get("Action"))]
    bad = [a for a in granted if a == "*" or a.lower().startswith(("iam:", "ec2:"))]
    bad += ["NotAction"] if any("NotAction" in s for s in statements) else []
    if bad:
        found.append(f"{iam}: {who}: grants {', '.join(bad)}; spot nodes running training code must get no EC2 or "
                     "IAM actions (the bucket only)")
    s3 = [s for s in statements
          if any(str(a) == "*" or str(a).lower().startswith("s3:") for a in listify(s.get("Action")))]
    off = [cfn_text(r) or repr(r) for s in s3 for r in listify(s.get("Resource")) + listify(s.get("NotResource"))
           if "NotResource" in s or not BUCKET_ARN.fullmatch(cfn_text(r) or "")]
    if off:
        found.append(f"{iam}: {who}: S3 on {off[0]!r}, not the Bucket parameter's bucket; name "
                     "arn:${AWS::Partition}:s3:::${Bucket} and arn:${AWS::Partition}:s3:::${Bucket}/*")
    return found


def profile_problems(config: dict[str, Any], template: dict[str, Any], iam: str) -> list[str]:
    """Every instance profile from the IAM template, none of the head's on a worker, the head able to
    pass each worker's role, and worker roles with the bucket only."""
    if not is_aws(config):
        return []
    types, head = node_types(config), config.get("head_node_type")
    profiles = instance_profiles(template)
    head_profile = profile_name((types.get(head) or {}).get("node_config") or {})
    found = [] if "Bucket" in (template.get("Parameters") or {}) else \
        [f"{iam}: Parameters: no Bucket parameter (the bucket the nodes read and write)"]
    workers: dict[str, list[str]] = {}  # worker profile -> the types naming it
    for name, spec in types.items():
        profile = profile_name(spec.get("node_config") or {})
        if profile is None:
            continue
        key = f"available_node_types.{name}.node_config.IamInstanceProfile"
        if name != head and profile in (head_profile, RAY_DEFAULT_PROFILE):
            others = ", ".join(p for p in profiles if p != head_profile) or "a worker profile"
            whose = "the head's profile" if profile == head_profile else "Ray's default head profile (EC2 full access)"
            found.append(f"{key}: {profile} is {whose}; spot nodes running training code must not get EC2 control "
                         f"or iam:PassRole: name {others} ({iam})")
        elif profile not in profiles:
            found.append(f"{key}: {profile!r} is a profile that does not exist in {iam} "
                         f"(it defines {', '.join(profiles) or 'none'})")
        elif name != head:
            workers.setdefault(profile, []).append(name)
    workers = {p: users for p, users in workers.items() if profiles[p]}
    if not workers:
        return found
    if head_profile is None:
        found += [f"available_node_types.{head}.node_config: no IamInstanceProfile, so Ray gives the head its "
                  f"default {RAY_DEFAULT_PROFILE}, whose role has no iam:PassRole: every launch of "
                  f"{', '.join(users)} with {p} would fail (UnauthorizedOperation); name the head's profile from {iam}"
                  for p, users in workers.items()]
    elif profiles.get(head_profile):
        found += passrole_problems(template, iam, profiles[head_profile], {p: profiles[p] for p in workers})
    for profile, users in workers.items():
        if profiles[profile] != profiles.get(head_profile):
            found += worker_role_problems(template, iam, profiles[profile], users)
    return found


# --- the stage directory -----------------------------------------------------------------------

def option_values(options: list[str], short: str, long: str) -> list[str]:
    """The values of one docker run option (``-e X``, ``--env X``, ``--env=X``) in a list of option strings."""
    words = [w for o in options for w in shlex.split(str(o))]
    values = []
    for i, word in enumerate(words):
        if word in (short, long) and i + 1 < len(words):
            values.append(words[i + 1])
        elif word.startswith(f"{long}="):
            values.append(word.split("=", 1)[1])
    return values


def shell_commands(lines: list[str]) -> list[list[str]]:
    """The simple commands of shell lines, as words (split at ``&&``, ``||``, ``;`` and ``|``)."""
    found = []
    for line in lines:
        for part in re.split(r"&&|\|\||;|\|", str(line)):
            try:
                found.append(shlex.split(part, comments=True))
            except ValueError:
                continue
    return found


def stage_problems(config: dict[str, Any]) -> list[str]:
    """Each worker type that sets the stage directory must mount it from the host (``-v``) and create
    and chown the host directory in its ``initialization_commands``."""
    from paco_ray.data.staging import STAGE_DIR_ENV

    docker = config.get("docker") or {}
    found = []
    for name in worker_types(config):
        spec = node_types(config)[name]
        own = spec.get("docker") or {}
        options = listify(docker.get("run_options")) + \
            listify(own.get("worker_run_options", docker.get("worker_run_options")))
        stage = [v.split("=", 1)[1] for v in option_values(options, "-e", "--env") if v.startswith(f"{STAGE_DIR_ENV}=")]
        if not stage:
            continue
        stage_dir = posixpath.normpath(stage[-1])
        host = None
        for volume in option_values(options, "-v", "--volume"):
            parts = volume.split(":")
            if len(parts) < 2 or not parts[0].startswith("/") or "ro" in ",".join(parts[2:]).split(","):
                continue
            outside, inside = posixpath.normpath(parts[0]), posixpath.normpath(parts[1])
            if stage_dir == inside or stage_dir.startswith(inside.rstrip("/") + "/"):
                host = posixpath.normpath(posixpath.join(outside, posixpath.relpath(stage_dir, inside)))
        if host is None:
            found.append(f"available_node_types.{name}: {STAGE_DIR_ENV}={stage_dir} (docker worker_run_options) is "
                         "on no writable -v HOST:CONTAINER mount of a host directory; the datasets would be staged "
                         "into the container's own layer")
            continue
        commands = shell_commands(listify(spec.get("initialization_commands", config.get("initialization_commands"))))
        names = [{posixpath.normpath(w) for w in words if not w.startswith("-")} for words in commands]
        parents = [any(w == "--parents" or re.fullmatch(r"-[a-zA-Z]*p[a-zA-Z]*", w) for w in words)
                   for words in commands]  # mkdir -p, -pv, --parents
        made = any("mkdir" in words and host in paths and p for words, paths, p in zip(commands, names, parents))
        owned = any("chown" in words and host in paths for words, paths in zip(commands, names))
        missing = " and ".join(verb for verb, done in (("creates (mkdir -p)", made), ("chowns", owned)) if not done)
        if missing:
            found.append(f"available_node_types.{name}.initialization_commands: nothing {missing} {host}, the host "
                         f"directory of {STAGE_DIR_ENV}={stage_dir}; add `sudo mkdir -p {host} && sudo chown 1000:100 "
                         f"{host}` (the image's ray user), else the container cannot write the stage directory")
    return found


def check(config: dict[str, Any], source: Path, bucket: bool = True, template: dict[str, Any] | None = None,
          iam: str = DEFAULT_IAM, cluster_file: str = "cluster.yaml") -> list[str]:
    """Every problem found, one line each (empty: the file is fit for ``ray up``); the instance
    profiles are checked against ``template`` (the IAM template read from ``iam``) when it is given."""
    found = [p for p in [schema_problem(config)] if p]
    found += sync_problems(config, source) + node_problems(config, bucket) + image_problems(config, cluster_file)
    if template is not None:
        found += profile_problems(config, template, iam)
    return found + stage_problems(config)


# --- pinning the images ------------------------------------------------------------------------

def ssm_versions(names: list[str], region: str | None, path: Path) -> tuple[dict[str, int], str | None]:
    """{parameter (or NAME:label): its current version} from SSM, or the one-line error."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    versions = {}
    try:
        ssm = boto3.session.Session().client("ssm", region_name=region) if names else None
        for name in names:
            try:
                versions[name] = ssm.get_parameter(Name=name)["Parameter"]["Version"]
            except (BotoCoreError, ClientError) as err:
                return {}, (f"{path}: ImageId resolve:ssm:{name}: SSM ({region or 'default region'}) cannot "
                            f"resolve it: {str(err).splitlines()[0].rstrip('.')}; {path} left unchanged")
    except BotoCoreError as err:  # no region, no credentials found while making the client
        return {}, f"{path}: SSM client: {str(err).splitlines()[0]}; {path} left unchanged"
    return versions, None


def pin_images(path: Path, update: bool = False) -> tuple[list[str], list[str]]:
    """Rewrite each ``ImageId: resolve:ssm:NAME`` line of the file into ``resolve:ssm:NAME:VERSION``
    (SSM's current version; with ``update`` the pinned ones too), the rest of the text as it was.
    Returns (what changed, errors); on any error the file is left unchanged."""
    import yaml

    try:
        import boto3  # noqa: F401  (ssm_versions asks SSM through it)
    except ImportError:
        return [], ["--pin-images needs boto3 (pip install boto3)"]
    raw = path.read_bytes().decode()
    config = yaml.safe_load(raw) or {}
    region = (config.get("provider") or {}).get("region")
    selectors = {}  # what to ask SSM for, per ImageId value of the text
    for match in IMAGE_LINE.finditer(raw):
        pinned = (match["suffix"] or "").isdigit()
        if pinned and not update:
            continue
        # a label (NAME:label) is resolved as such; a pinned version, with --update, by NAME alone
        selectors[match["value"]] = match["name"] if pinned or not match["suffix"] else \
            f"{match['name']}:{match['suffix']}"
    versions, error = ssm_versions(list(dict.fromkeys(selectors.values())), region, path)
    if error:
        return [], [error]

    changed, written = [], set()

    def pin(match: re.Match) -> str:
        if match["value"] not in selectors:
            return match[0]
        new = f"resolve:ssm:{match['name']}:{versions[selectors[match['value']]]}"
        written.add(new)
        if new != match["value"]:
            line = raw.count("\n", 0, match.start()) + 1
            changed.append(f"{path}:{line}: ImageId {match['value']} -> {new}")
        return f"{match['key']}{match['q']}{new}{match['q']}"

    text = IMAGE_LINE.sub(pin, raw)
    left = [(name, image) for name, spec in node_types(yaml.safe_load(text) or {}).items()
            if isinstance(image := (spec.get("node_config") or {}).get("ImageId"), str)
            and SSM_IMAGE.match(image) and (not PINNED.match(image) or update and image not in written)]
    if left:
        name, image = left[0]
        return [], [f"{path}: available_node_types.{name}.node_config.ImageId: {image!r} is not on an "
                    f"`ImageId: resolve:ssm:...` line of its own, so it cannot be pinned here; {path} left unchanged"]
    if text != raw:
        write_text(*filesystem(str(path.resolve())), text)
    if not selectors and not IMAGE_LINE.search(raw):
        changed.append(f"{path}: no `ImageId: resolve:ssm:...` line to pin")
    elif not changed:
        changed.append(f"{path}: every resolve:ssm: ImageId is pinned" + (" to its current version" if update else
                                                                          " (--update moves them to the current one)"))
    return changed, []


def main(argv: list[str] | None = None) -> int:
    import yaml

    from .manifest_check import check_manifest

    parser = argparse.ArgumentParser(prog="python -m paco_ray.cluster_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cluster", help="cluster launcher YAML (cluster.yaml), or a KubeRay RayCluster/RayJob manifest")
    parser.add_argument("more", nargs="*", metavar="MANIFEST",
                        help="with a KubeRay manifest: the other manifests it uses (serviceaccounts.yaml)")
    parser.add_argument("--source", default=".", help="the directory `ray up` copies (default: the working directory)")
    parser.add_argument("--no-bucket", action="store_true", help="data and results are not in object storage")
    parser.add_argument("--iam", help=f"the IAM template the instance profiles come from (default: {DEFAULT_IAM} "
                                      "under --source)")
    parser.add_argument("--pin-images", action="store_true",
                        help="write the current SSM parameter version into each unpinned resolve:ssm: ImageId (needs "
                             "boto3 and AWS credentials)")
    parser.add_argument("--update", action="store_true", help="with --pin-images: move pinned ImageIds to the current "
                                                              "version too")
    args = parser.parse_args(argv)
    if args.update and not args.pin_images:
        parser.error("--update goes with --pin-images")
    if args.pin_images:
        try:
            changed, errors = pin_images(Path(args.cluster), update=args.update)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            changed, errors = [], [f"{args.cluster}: {type(err).__name__}: {str(err).splitlines()[0]}"]
        for line in changed:
            print(line)
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        return 2 if errors else 0
    documents = []
    for path in [args.cluster, *args.more]:
        try:
            documents += [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
        except (OSError, yaml.YAMLError) as err:
            print(f"error: {path}: {type(err).__name__}: {str(err).splitlines()[0]}", file=sys.stderr)
            return 2
    if any(isinstance(d, dict) and d.get("kind") in ("RayCluster", "RayJob") for d in documents):
        return report(check_manifest(documents), " ".join([args.cluster, *args.more]), "kubectl apply")
    if len(documents) != 1 or args.more:
        print(f"error: {args.cluster}: expected one cluster launcher config (or KubeRay manifests)", file=sys.stderr)
        return 2
    config = documents[0]
    iam = args.iam or str(Path(args.source) / DEFAULT_IAM)
    found, template = [], None
    try:
        if is_aws(config):  # where the instance profiles matter
            template = yaml.safe_load(Path(iam).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        found.append(f"{iam}: {type(err).__name__}: {str(err).splitlines()[0]} (the IAM template the instance "
                     "profiles come from: --iam PATH)")
    found += check(config, Path(args.source).resolve(), bucket=not args.no_bucket, template=template, iam=iam,
                   cluster_file=args.cluster)
    return report(found, args.cluster, "ray up")


def report(found: list[str], what: str, command: str) -> int:
    for problem in found:
        print(f"error: {problem}", file=sys.stderr)
    if not found:
        print(f"{what}: fit for {command}")
    return 2 if found else 0


if __name__ == "__main__":
    sys.exit(main())
