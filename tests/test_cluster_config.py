"""cluster.yaml against Ray's own cluster-launcher schema and the project's invariants (no cloud)."""
import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from paco_ray.search_space import load_space

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def validate(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def pins():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(re.match(r"([A-Za-z0-9_.\-\[\],]+)==([^\s;]+)", d).groups() for d in deps)


def test_cluster_yaml_passes_rays_schema_and_a_typo_does_not(cluster):
    validate(cluster)
    typo = copy.deepcopy(cluster)
    typo["available_node_types"]["gpu_large"]["min_wrokers"] = 0
    with pytest.raises(Exception, match="min_wrokers"):
        validate(typo)


def test_nodes_install_the_project_as_the_readme_does(cluster):
    readme = (REPO / "README.md").read_text()
    # what training needs (no test tools), and the project's .venv first on the nodes' PATH
    assert "./setup.sh" in readme and cluster["setup_commands"][0] == "cd ~/paco_ray && ./setup.sh --runtime"
    assert "paco_ray/.venv/bin:$PATH" in cluster["setup_commands"][1] and ".bashrc" in cluster["setup_commands"][1]
    assert cluster["file_mounts"]["~/paco_ray"] == "."
    ray_pin = pins()["ray[train,tune,default]"]
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{ray_pin}-py311")  # same Ray, Python 3.11
    starts = [c for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"] if "ray " in c]
    assert len(starts) == 4 and all("~/paco_ray/.venv/bin/ray" in c for c in starts)  # Ray from the pinned .venv


def test_dashboard_stays_local_and_token_auth_is_on(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in yaml.safe_dump(cluster)
    for command in cluster["head_start_ray_commands"][1:] + cluster["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command or "paco_ray.monitoring" in command
    assert "-e RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token for all nodes


def test_gpu_workers_fit_the_imagenet_trials(cluster):
    space = load_space(REPO / "search_spaces" / "imagenet_lt.yaml")
    r = space.resources
    worker_need = {"CPU": r.workers * r.cpus_per_worker, "GPU": r.workers}
    types = cluster["available_node_types"]
    fitting = [name for name, t in types.items() if name != cluster["head_node_type"]
               and all(t["resources"].get(k, 0) >= v for k, v in worker_need.items())]
    assert fitting, f"no worker type holds one ImageNet-LT trial ({worker_need})"
    gpus = sum(types[n]["resources"]["GPU"] * types[n]["max_workers"] for n in fitting)
    assert gpus >= space.max_concurrent_trials * r.workers  # max_concurrent_trials can all run
    # the trial drivers (fractions of a CPU) fit on the head node
    head = types[cluster["head_node_type"]]["resources"]
    assert head["CPU"] >= space.max_concurrent_trials * r.trial_driver_cpus
    # and a one-GPU CIFAR trial fits the small GPU type
    cifar = load_space(REPO / "search_spaces" / "cifar100_lt.yaml").resources
    assert types["gpu_small"]["resources"]["CPU"] >= cifar.cpus_per_worker and types["gpu_small"]["resources"]["GPU"] >= 1


def test_data_is_staged_on_local_disk_and_never_rsynced(cluster):
    from paco_ray.data.staging import STAGE_DIR_ENV

    options = cluster["docker"]["worker_run_options"]
    assert any(o.startswith(f"-e {STAGE_DIR_ENV}=/mnt/local/") for o in options)
    assert any(o.startswith("-v ") and o.endswith(":/mnt/local") for o in options)  # the host's local disk
    # the stage directory on the host's NVMe is made writable for the container's user on each GPU type
    for name, spec in cluster["available_node_types"].items():
        if spec["resources"].get("GPU"):
            assert any("/opt/dlami/nvme/paco_ray" in c and "chown" in c for c in spec["initialization_commands"])


def tracked_tree(tmp_path: Path) -> Path:
    """A copy of the repository's tracked files plus what a working copy also holds: a dataset, a
    run folder, a virtualenv, Parquet and .beton files."""
    import shutil
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "repo"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, source / name)
    for junk in ("data/imagenet_lt/train.beton", "data/imagenet_lt/manifest.parquet", "runs/r/checkpoint/state.pt",
                 ".venv/bin/python", "paco_ray/data/__pycache__/x.pyc", "scratch/out.beton"):
        (source / junk).parent.mkdir(parents=True, exist_ok=True)
        (source / junk).write_text("x")
    return source


def test_rsync_copies_every_code_file_and_no_data(cluster, tmp_path):
    from paco_ray.cluster_check import check, sync_problems, synced_files

    source = tracked_tree(tmp_path)
    synced = synced_files(cluster, source)
    code = {str(p.relative_to(source)) for d in ("paco_ray", "pipelines", "configs", "search_spaces")
            for p in (source / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert {"paco_ray/data/loaders.py", "paco_ray/data/__init__.py"} <= code <= synced
    assert not [f for f in synced if f.startswith(("data/", "runs/", ".venv/")) or f.endswith((".beton", ".parquet"))
                or "__pycache__" in f]
    assert sync_problems(cluster, source) == []
    # the shipped file's former excludes: an unanchored `data` drops the package paco_ray/data/
    unanchored = {**cluster, "rsync_exclude": [".venv", "runs", "data", "**/*.beton"]}
    assert "paco_ray/data/loaders.py" not in synced_files(unanchored, source)
    assert any("code files would not reach the nodes" in p for p in check(unanchored, source))


def test_images_and_worker_profiles_are_checked_offline(cluster, tmp_path):
    from paco_ray.cluster_check import node_problems

    assert node_problems(cluster, bucket=True) == []
    old_form = copy.deepcopy(cluster)
    old_form["available_node_types"]["gpu_small"]["node_config"]["ImageId"] = \
        "resolve-ssm-parameter:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
    assert ["ImageId" in p and "gpu_small" in p for p in node_problems(old_form, bucket=True)] == [True]
    no_profile = copy.deepcopy(cluster)
    del no_profile["available_node_types"]["gpu_large"]["node_config"]["IamInstanceProfile"]
    (problem,) = node_problems(no_profile, bucket=True)
    assert problem.startswith("available_node_types.gpu_large.node_config: no IamInstanceProfile")
    assert node_problems(no_profile, bucket=False) == []  # data and results not in a bucket: not needed


def test_the_head_serves_prometheus_and_grafana_to_the_dashboard_on_loopback(cluster):
    start = " ".join(cluster["head_start_ray_commands"])
    for variable in ("RAY_PROMETHEUS_HOST=http://127.0.0.1:9090", "RAY_GRAFANA_HOST=http://127.0.0.1:3000",
                     "RAY_GRAFANA_IFRAME_HOST=http://127.0.0.1:3000"):
        assert variable in start
    assert start.index("ray start --head") < start.index("paco_ray.monitoring start")  # Ray writes their configs first
    setup = " ".join(cluster["head_setup_commands"])
    assert "prometheus-2." in setup and "grafana-" in setup


def test_monitoring_binds_loopback_and_makes_a_private_admin_password(tmp_path, monkeypatch):
    import stat

    from paco_ray import monitoring

    password = monitoring.admin_password_file(tmp_path / "pw")
    assert stat.S_IMODE(password.stat().st_mode) == 0o600 and len(password.read_text()) >= 24
    assert monitoring.admin_password_file(tmp_path / "pw").read_text() == password.read_text()  # made once
    calls = []
    monkeypatch.setattr(monitoring.subprocess, "Popen", lambda args, **kw: calls.append((args, kw.get("env"))))
    session = tmp_path / "session"
    (session / "metrics" / "prometheus").mkdir(parents=True)
    (session / "metrics" / "prometheus" / "prometheus.yml").write_text("scrape_configs: []\n")
    monitoring.start_prometheus("prometheus", session, 9090, tmp_path / "data")
    monitoring.start_grafana(tmp_path / "grafana", session, 3000, tmp_path / "pw")
    (prometheus, _), (grafana, env) = calls
    assert "--web.listen-address=127.0.0.1:9090" in prometheus
    assert env["GF_SERVER_HTTP_ADDR"] == "127.0.0.1" and env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == str(tmp_path / "pw")
    assert "admin" not in env.get("GF_SECURITY_ADMIN_PASSWORD", "")


# --- least-privilege profiles, pinned images, the stage directory (paco_ray.cluster_check) --------

IAM = REPO / "deploy" / "aws" / "iam.yaml"
SHIPPED_IMAGE = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
PINNED_IMAGE = SHIPPED_IMAGE + ":42"
NO_PASSROLE = (f"{IAM}: no PassRole: the head's role paco-ray-head cannot pass paco-ray-worker's role to EC2; "
               "every worker launch would fail (UnauthorizedOperation)")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """What `ray up` would copy, with the IAM template at its default place under it."""
    import shutil

    tree = tracked_tree(tmp_path_factory.mktemp("source"))
    (tree / "deploy" / "aws").mkdir(parents=True, exist_ok=True)
    shutil.copy(IAM, tree / "deploy" / "aws" / "iam.yaml")
    return tree


def run_check(capsys, cluster_file, source, *args):
    """main()'s exit code and its error lines (without the `error: ` prefix)."""
    from paco_ray.cluster_check import main

    code = main([str(cluster_file), "--source", str(source), *map(str, args)])
    err = capsys.readouterr().err
    return code, [line.removeprefix("error: ") for line in err.splitlines()]


def pinned_text():
    text = (REPO / "cluster.yaml").read_text()
    assert text.count(SHIPPED_IMAGE) == 1  # written once, on the head
    return text.replace(SHIPPED_IMAGE, PINNED_IMAGE)


def variant(tmp_path, edit, name="cluster.yaml"):
    """The pinned cluster file, edited as data by ``edit(config)``, written to tmp_path."""
    config = yaml.safe_load(pinned_text())
    edit(config)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def template_variant(tmp_path, edit):
    """The shipped IAM template, edited as data by ``edit(resources)``, written to tmp_path."""
    template = yaml.safe_load(IAM.read_text())
    edit(template["Resources"])
    path = tmp_path / "iam.yaml"
    path.write_text(yaml.safe_dump(template, sort_keys=False))
    return path


def head_statements(resources):
    return resources["HeadRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]


def node(config, name):
    return config["available_node_types"][name]


def test_the_shipped_cluster_file_only_wants_its_image_pinned(capsys, source, tmp_path):
    shipped = REPO / "cluster.yaml"
    code, errors = run_check(capsys, shipped, source)
    assert code == 2 and errors == [
        f"available_node_types.head.node_config.ImageId (and gpu_small, gpu_large): '{SHIPPED_IMAGE}' is not pinned "
        "to a version of its SSM parameter, so nodes launched later may boot another AMI; run "
        f"`python -m paco_ray.cluster_check {shipped} --pin-images`"]
    pinned = tmp_path / "cluster.yaml"
    pinned.write_text(pinned_text())
    from paco_ray.cluster_check import main

    assert main([str(pinned), "--source", str(source)]) == 0  # the default template: under --source
    assert capsys.readouterr().out == f"{pinned}: fit for ray up\n"
    assert run_check(capsys, pinned, source, "--iam", IAM) == (0, [])


def test_the_cluster_file_names_the_templates_profiles_and_one_image(cluster):
    text = (REPO / "cluster.yaml").read_text()
    head = cluster["head_node_type"]
    workers = [n for n in cluster["available_node_types"] if n != head]
    assert node(cluster, head)["node_config"]["IamInstanceProfile"] == {"Name": "paco-ray-head"}
    assert all(node(cluster, w)["node_config"]["IamInstanceProfile"] == {"Name": "paco-ray-worker"} for w in workers)
    assert "ray-autoscaler-v1}" not in text
    assert re.findall(r"ImageId: (\S+)", text) == ["&image"] + ["*image"] * len(workers)
    assert {node(cluster, n)["node_config"]["ImageId"] for n in cluster["available_node_types"]} == {SHIPPED_IMAGE}
    # the header lists the commands in order: the roles, the pin, the check, the token, ray up
    header = text[:text.index("cluster_name:")]
    steps = ["aws cloudformation deploy --template-file deploy/aws/iam.yaml", "cluster.yaml --pin-images  ",
             "cluster_check cluster.yaml   #", "ray get-auth-token", "ray up cluster.yaml"]
    assert [header.index(s) for s in steps] == sorted(header.index(s) for s in steps)
    assert "--pin-images --update" in header


def test_boto3_is_pinned_once():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (pin,) = extras["aws"]
    assert re.fullmatch(r"boto3==[\d.]+", pin) and pin in extras["dev"]
    head_setup = yaml.safe_load((REPO / "cluster.yaml").read_text())["head_setup_commands"]
    assert any(f"pip install -q {pin}" in c for c in head_setup)  # the head's autoscaler uses the same boto3
    import boto3

    assert pin == f"boto3=={boto3.__version__}"  # the one the tests run


def test_the_iam_template_grants_least_privilege():
    """An independent reading of deploy/aws/iam.yaml: the workers get the bucket only, the head what
    Ray's AWS node provider calls and iam:PassRole on the worker role alone."""
    import fnmatch

    import ray.autoscaler._private.aws.node_provider as node_provider

    template = yaml.safe_load(IAM.read_text())  # plain YAML: no !Ref / !Sub tags
    assert list(template["Parameters"]) == ["Bucket"]
    res = template["Resources"]
    profiles = {r["Properties"]["InstanceProfileName"]: r["Properties"]["Roles"] for r in res.values()
                if r["Type"] == "AWS::IAM::InstanceProfile"}
    assert profiles == {"paco-ray-worker": [{"Ref": "WorkerRole"}], "paco-ray-head": [{"Ref": "HeadRole"}]}
    assert {k: v["Value"] for k, v in template["Outputs"].items()} == {
        "HeadProfile": {"Ref": "HeadProfile"}, "WorkerProfile": {"Ref": "WorkerProfile"}}
    trust = {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
    for role, name in (("WorkerRole", "paco-ray-worker"), ("HeadRole", "paco-ray-head")):
        props = res[role]["Properties"]
        assert props["RoleName"] == name and props["AssumeRolePolicyDocument"]["Statement"] == [trust]
        assert props["ManagedPolicyArns"] == [{"Ref": "BucketAccess"}]  # the same bucket access, defined once
    # the workers: S3 on the Bucket parameter's bucket, nothing else
    assert "Policies" not in res["WorkerRole"]["Properties"]
    bucket = res["BucketAccess"]["Properties"]["PolicyDocument"]["Statement"]
    assert all(s["Effect"] == "Allow" and "Condition" not in s for s in bucket)
    assert {s["Resource"]["Fn::Sub"]: set(s["Action"]) for s in bucket} == {
        "arn:${AWS::Partition}:s3:::${Bucket}": {"s3:ListBucket", "s3:GetBucketLocation",
                                                 "s3:ListBucketMultipartUploads"},
        "arn:${AWS::Partition}:s3:::${Bucket}/*": {"s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                                                   "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"}}
    # the head: PassRole on the worker role's ARN only, to EC2 only
    statements = head_statements(res)
    def granted(statement):
        return [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]

    actions = [a for s in statements for a in granted(s)]
    assert all(s["Effect"] == "Allow" for s in statements) and "*" not in actions
    (passrole,) = [s for s in statements if any(fnmatch.fnmatch("iam:passrole", a.lower()) for a in granted(s))]
    assert passrole["Action"] == "iam:PassRole" and passrole["Resource"] == {"Fn::GetAtt": ["WorkerRole", "Arn"]}
    assert passrole["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    assert {a.split(":")[0] for a in actions} == {"ec2", "ssm", "iam"}  # S3 comes from BucketAccess
    # every EC2 call of Ray's node provider is granted (boto3 names -> IAM actions)
    calls = set(re.findall(r"\b(?:client|ec2|ec2_fail_fast)\.(?:meta\.client\.)?([a-z]+_[a-z_]+)\b",
                           Path(node_provider.__file__).read_text()))
    assert {"create_instances", "create_tags", "terminate_instances", "stop_instances", "start_instances"} <= calls
    needed = {"RunInstances" if c == "create_instances" else "".join(w.title() for w in c.split("_")) for c in calls}
    needed |= {"DescribeInstances"}  # ec2.instances.filter(...)
    for action in needed:
        assert any(fnmatch.fnmatchcase(f"ec2:{action}", a) for a in actions), action
    (ssm,) = [s for s in statements if "ssm:" in str(s["Action"])]
    assert set(ssm["Action"]) == {"ssm:GetParameters", "ssm:GetParameter"}
    assert ssm["Resource"] == {"Fn::Sub": "arn:${AWS::Partition}:ssm:*:*:parameter/aws/service/*"}


def test_an_image_of_a_worker_that_is_not_the_heads_is_one_line(capsys, tmp_path, source):
    path = variant(tmp_path, lambda c: node(c, "gpu_large")["node_config"].update(ImageId="ami-0123456789abcdef0"))
    assert run_check(capsys, path, source) == (2, [
        f"available_node_types.gpu_large.node_config.ImageId: 'ami-0123456789abcdef0' is not the head's "
        f"('{PINNED_IMAGE}'), so these workers would drift from the head's image; write it once "
        "(`ImageId: &image ...` on the head, `ImageId: *image` on the workers)"])


def test_a_profile_the_template_does_not_define_is_one_line(capsys, tmp_path, source):
    path = variant(tmp_path, lambda c: node(c, "gpu_small")["node_config"].update(
        IamInstanceProfile={"Name": "paco-ray-wroker"}))
    iam = source / "deploy" / "aws" / "iam.yaml"
    assert run_check(capsys, path, source) == (2, [
        f"available_node_types.gpu_small.node_config.IamInstanceProfile: 'paco-ray-wroker' is a profile that does "
        f"not exist in {iam} (it defines paco-ray-worker, paco-ray-head)"])
    code, errors = run_check(capsys, path, source, "--iam", tmp_path / "missing.yaml")
    assert code == 2 and errors[0].startswith(f"{tmp_path / 'missing.yaml'}: FileNotFoundError")


@pytest.mark.parametrize("profile, whose", [("paco-ray-head", "the head's profile"),
                                            ("ray-autoscaler-v1", "Ray's default head profile (EC2 full access)")])
def test_a_worker_with_the_heads_profile_is_refused(capsys, tmp_path, source, profile, whose):
    path = variant(tmp_path, lambda c: node(c, "gpu_large")["node_config"].update(IamInstanceProfile={"Name": profile}))
    assert run_check(capsys, path, source, "--iam", IAM) == (2, [
        f"available_node_types.gpu_large.node_config.IamInstanceProfile: {profile} is {whose}; spot nodes running "
        f"training code must not get EC2 control or iam:PassRole: name paco-ray-worker ({IAM})"])


def test_a_head_role_without_passrole_on_the_worker_role_is_one_line(capsys, tmp_path, source):
    pinned = tmp_path / "cluster.yaml"
    pinned.write_text(pinned_text())

    def without_passrole(resources):
        head_statements(resources)[:] = [s for s in head_statements(resources) if s["Action"] != "iam:PassRole"]

    iam = template_variant(tmp_path, without_passrole)
    assert run_check(capsys, pinned, source, "--iam", iam) == (2, [NO_PASSROLE.replace(str(IAM), str(iam))])

    def passrole(resource):
        def edit(resources):
            next(s for s in head_statements(resources) if s["Action"] == "iam:PassRole")["Resource"] = resource
        return template_variant(tmp_path, edit)

    another = passrole("arn:aws:iam::123456789012:role/another-role")
    assert run_check(capsys, pinned, source, "--iam", another) == (2, [NO_PASSROLE.replace(str(IAM), str(another))])
    by_name = passrole({"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:role/paco-ray-worker"})
    assert run_check(capsys, pinned, source, "--iam", by_name) == (0, [])
    anything = passrole("*")
    assert run_check(capsys, pinned, source, "--iam", anything) == (2, [
        f"{anything}: Resources.HeadRole: iam:PassRole on '*': the head could hand any role it matches (an admin "
        "one too) to an instance it starts; name the worker role's ARN only"])


def test_a_head_without_a_profile_cannot_launch_profiled_workers(capsys, tmp_path, source):
    path = variant(tmp_path, lambda c: node(c, "head")["node_config"].pop("IamInstanceProfile"))
    assert run_check(capsys, path, source, "--iam", IAM) == (2, [
        "available_node_types.head.node_config: no IamInstanceProfile, so Ray gives the head its default "
        "ray-autoscaler-v1, whose role has no iam:PassRole: every launch of gpu_small, gpu_large with "
        f"paco-ray-worker would fail (UnauthorizedOperation); name the head's profile from {IAM}"])


@pytest.mark.parametrize("edit, says", [
    (lambda r: r["WorkerRole"]["Properties"].update(Policies=[{"PolicyName": "more", "PolicyDocument": {
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["ec2:*"], "Resource": "*"}]}}]),
     "grants ec2:*; spot nodes running training code must get no EC2 or IAM actions (the bucket only)"),
    (lambda r: r["WorkerRole"]["Properties"].update(Policies=[{"PolicyName": "more", "PolicyDocument": {
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iam:PassRole", "Resource": "*"}]}}]),
     "grants iam:PassRole; spot nodes running training code must get no EC2 or IAM actions (the bucket only)"),
    (lambda r: r["BucketAccess"]["Properties"]["PolicyDocument"]["Statement"][1].update(Resource="arn:aws:s3:::*"),
     "S3 on 'arn:aws:s3:::*', not the Bucket parameter's bucket; name arn:${AWS::Partition}:s3:::${Bucket} and "
     "arn:${AWS::Partition}:s3:::${Bucket}/*"),
    (lambda r: r["WorkerRole"]["Properties"]["ManagedPolicyArns"].append("arn:aws:iam::aws:policy/AmazonEC2FullAccess"),
     "attaches arn:aws:iam::aws:policy/AmazonEC2FullAccess, which this check cannot read; a worker role gets the "
     "bucket only"),
])
def test_a_worker_role_beyond_the_bucket_is_one_line(capsys, tmp_path, source, edit, says):
    pinned = tmp_path / "cluster.yaml"
    pinned.write_text(pinned_text())
    iam = template_variant(tmp_path, edit)
    assert run_check(capsys, pinned, source, "--iam", iam) == (2, [
        f"{iam}: Resources.WorkerRole (paco-ray-worker, the role of gpu_small, gpu_large): {says}"])


def test_the_stage_directory_must_be_a_created_and_chowned_host_mount(capsys, tmp_path, source):
    unmounted = variant(tmp_path, lambda c: node(c, "gpu_small").update(
        docker={"worker_run_options": ["-e PACO_RAY_STAGE_DIR=/mnt/local/paco_ray"]}))
    assert run_check(capsys, unmounted, source) == (2, [
        "available_node_types.gpu_small: PACO_RAY_STAGE_DIR=/mnt/local/paco_ray (docker worker_run_options) is on "
        "no writable -v HOST:CONTAINER mount of a host directory; the datasets would be staged into the container's "
        "own layer"])
    host = "/opt/dlami/nvme/paco_ray"
    for commands, missing in (([f"sudo mkdir -p {host}"], "chowns"),
                              ([f"sudo chown 1000:100 {host}"], "creates (mkdir -p)"),
                              (["sudo mkdir -p /opt/dlami/nvme/other && sudo chown 1000:100 /opt/dlami/nvme/other"],
                               "creates (mkdir -p) and chowns")):
        path = variant(tmp_path, lambda c: node(c, "gpu_large").update(initialization_commands=commands))
        assert run_check(capsys, path, source) == (2, [
            f"available_node_types.gpu_large.initialization_commands: nothing {missing} {host}, the host directory "
            f"of PACO_RAY_STAGE_DIR=/mnt/local/paco_ray; add `sudo mkdir -p {host} && sudo chown 1000:100 {host}` "
            "(the image's ray user), else the container cannot write the stage directory"])


def test_no_bucket_still_needs_no_worker_profile(capsys, tmp_path, source):
    def without_worker_profiles(config):
        for name in ("gpu_small", "gpu_large"):
            del node(config, name)["node_config"]["IamInstanceProfile"]

    path = variant(tmp_path, without_worker_profiles)
    assert run_check(capsys, path, source, "--no-bucket") == (0, [])
    code, errors = run_check(capsys, path, source)
    assert code == 2 and [e.split(":")[0] for e in errors] == [
        "available_node_types.gpu_small.node_config", "available_node_types.gpu_large.node_config"]


# --- --pin-images against a real SSM server ---------------------------------------------------

@pytest.fixture(scope="module")
def ssm():
    """A real SSM server (moto's server mode) on 127.0.0.1, reached through the standard environment
    (AWS_ENDPOINT_URL, dummy keys) exactly as AWS would be; a client in cluster.yaml's region."""
    import logging
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    region = yaml.safe_load((REPO / "cluster.yaml").read_text())["provider"]["region"]
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            env.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.delenv(key, raising=False)
        yield boto3.client("ssm", region_name=region)
    server.stop()


def pin(capsys, path, *args):
    from paco_ray.cluster_check import main

    code = main([str(path), "--pin-images", *args])
    out = capsys.readouterr()
    return code, out.out.splitlines(), [line for line in out.err.splitlines() if line.startswith("error: ")]


def test_pin_images_writes_the_ssm_version_into_the_image_lines_only(ssm, capsys, tmp_path):
    text = (REPO / "cluster.yaml").read_text().replace(SHIPPED_IMAGE, "resolve:ssm:/paco-test/ami-id")
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    for ami in ("ami-0aaaaaaaaaaaaaaa1", "ami-0aaaaaaaaaaaaaaa2"):
        ssm.put_parameter(Name="/paco-test/ami-id", Value=ami, Type="String", Overwrite=True)
    code, out, errors = pin(capsys, path)
    line = text[:text.index("resolve:ssm:/paco-test/ami-id")].count("\n") + 1
    assert (code, errors) == (0, []) and out == [
        f"{path}:{line}: ImageId resolve:ssm:/paco-test/ami-id -> resolve:ssm:/paco-test/ami-id:2"]
    pinned = path.read_text()
    assert pinned == text.replace("resolve:ssm:/paco-test/ami-id", "resolve:ssm:/paco-test/ami-id:2")
    changed = [(a, b) for a, b in zip(text.splitlines(), pinned.splitlines()) if a != b]
    assert [b.strip() for a, b in changed] == ["ImageId: &image resolve:ssm:/paco-test/ami-id:2"]  # comments kept
    config = yaml.safe_load(pinned)
    assert {n["node_config"]["ImageId"] for n in config["available_node_types"].values()} == {
        "resolve:ssm:/paco-test/ami-id:2"}
    from paco_ray.cluster_check import image_problems

    assert image_problems(config) == []
    assert pin(capsys, path)[:2] == (0, [f"{path}: every resolve:ssm: ImageId is pinned (--update moves them to "
                                         "the current one)"]) and path.read_text() == pinned
    ssm.put_parameter(Name="/paco-test/ami-id", Value="ami-0aaaaaaaaaaaaaaa3", Type="String", Overwrite=True)
    assert pin(capsys, path, "--update") == (0, [
        f"{path}:{line}: ImageId resolve:ssm:/paco-test/ami-id:2 -> resolve:ssm:/paco-test/ami-id:3"], [])
    assert path.read_text() == text.replace("resolve:ssm:/paco-test/ami-id", "resolve:ssm:/paco-test/ami-id:3")


def test_pin_images_leaves_the_file_unchanged_on_an_ssm_error(ssm, capsys, tmp_path, monkeypatch):
    path = tmp_path / "cluster.yaml"
    path.write_text((REPO / "cluster.yaml").read_text().replace(SHIPPED_IMAGE, "resolve:ssm:/paco-test/no-such-ami"))
    before = path.read_bytes()
    code, out, errors = pin(capsys, path)
    assert code == 2 and out == [] and len(errors) == 1
    assert errors[0].startswith(f"error: {path}: ImageId resolve:ssm:/paco-test/no-such-ami: SSM (us-west-2) cannot "
                                "resolve it: ") and "ParameterNotFound" in errors[0]
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]  # no temporary file left
    # no credentials anywhere: one line, the file as it was
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    for key in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "BOTO_CONFIG"):
        monkeypatch.setenv(key, str(tmp_path / "none"))
    code, out, errors = pin(capsys, path)
    assert code == 2 and len(errors) == 1 and "resolve:ssm:/paco-test/no-such-ami" in errors[0]
    assert "credentials" in errors[0] and path.read_bytes() == before


def test_pin_images_without_boto3_says_so(capsys, tmp_path, monkeypatch):
    import sys

    path = tmp_path / "cluster.yaml"
    path.write_text(pinned_text())
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    assert pin(capsys, path) == (2, [], ["error: --pin-images needs boto3 (pip install boto3)"])
    assert path.read_text() == pinned_text()


def test_the_readme_walks_through_the_aws_setup_in_order():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Run on a cluster"):]
    steps = ["# 1. create the IAM roles",
             "aws cloudformation deploy --template-file deploy/aws/iam.yaml --stack-name paco-ray-iam \\\n"
             "    --parameter-overrides Bucket=YOUR-BUCKET --capabilities CAPABILITY_NAMED_IAM",
             "# 2. pin the image", "python -m paco_ray.cluster_check cluster.yaml --pin-images\n",
             "# 3. check the cluster file", "# 4. the cluster's token", "# 5. start the cluster", "ray up cluster.yaml"]
    assert [section.index(s) for s in steps] == sorted(section.index(s) for s in steps)
    assert "`iam:PassRole` on the head's role" in section and "role/paco-ray-head" in section
    assert "--pin-images --update" in section and "attach an inline policy allowing" not in section
