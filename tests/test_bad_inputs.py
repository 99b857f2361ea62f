"""Bad input across the CLIs (config, YAML, search spaces, datasets, checkpoints): each gives exit
code 2 and one line naming the culprit, and nothing written before (a finished run, a prepared
dataset, a Tune experiment) is modified. No Ray cluster: every case fails before one is needed."""
import hashlib

import pytest
import yaml

from conftest import make_fashion_root
from paco_ray import evaluate as evaluate_cli
from paco_ray import train as train_cli
from paco_ray import tune as tune_cli
from paco_ray.config import load_config
from paco_ray.loop import train
from paco_ray.session import LocalSession
from pipelines import fashion_mnist, txt_list


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_dataset):
    """Finished work that no bad input may touch: a run with its checkpoint, a prepared dataset,
    a Tune experiment."""
    ws = tmp_path_factory.mktemp("workspace")
    cfg = load_config(None, [f"data.path={tiny_dataset}", "data.loader=torch", "data.batch_size=16", "workers=1",
                             "optim.epochs=1", "optim.warmup_epochs=0", "paco.queue_size=37",
                             f"storage_path={ws / 'runs'}"])
    session = LocalSession(ws / "runs" / "done")
    train(cfg, session)
    experiment = ws / "tune" / "exp"
    experiment.mkdir(parents=True)
    (experiment / "summary.txt").write_text("finished results\n")
    return {"ws": ws, "dataset": tiny_dataset, "checkpoint": session.reports[-1]["checkpoint_path"]}


def snapshot(*roots) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def space(w, scratch, **changes):
    raw = {"base": {"data": {"path": str(w["dataset"]), "batch_size": 16}, "optim": {"epochs": 2}},
           "search": {"paco": {"temperature": {"loguniform": [0.05, 0.3]}}},
           "scheduler": {"max_t": 2}, "num_samples": 1, "storage_path": str(w["ws"] / "tune"), "name": "exp"}
    raw.update(changes)
    path = scratch / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def write(scratch, name, text):
    (scratch / name).write_text(text)
    return str(scratch / name)


def garbage_checkpoint(scratch):
    (scratch / "ckpt").mkdir()
    (scratch / "ckpt" / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    return str(scratch / "ckpt")


def foreign_checkpoint(scratch):
    import torch

    (scratch / "ckpt").mkdir()
    torch.save({"model": {}}, scratch / "ckpt" / "state.pt")
    return str(scratch / "ckpt")


def truncated_idx_root(scratch):
    root, *_ = make_fashion_root(scratch / "fm")
    data = (root / "t10k-images-idx3-ubyte").read_bytes()
    (root / "t10k-images-idx3-ubyte").write_bytes(data[: len(data) // 2])
    return str(root)


def bad_label_list(scratch, label):
    root = scratch / "img"
    (root / "a").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(root / "a" / "0.jpg")
    write(scratch, "train.txt", f"a/0.jpg {label}\n")
    write(scratch, "val.txt", "a/0.jpg 0\n")
    return ["--root", str(root), "--train-list", str(scratch / "train.txt"), "--val-list", str(scratch / "val.txt"),
            "--out", str(scratch / "out")]


CASES = [  # (id, command, argv(workspace, scratch), what the one line must say)
    ("train-unknown-key", train_cli, lambda w, s: ["--set", "paco.tau=1"], "unknown key paco.tau"),
    ("train-zero-temperature", train_cli, lambda w, s: ["--set", "paco.temperature=0"], "paco.temperature: must be > 0"),
    ("train-batch-not-divisible", train_cli, lambda w, s: ["--set", "data.batch_size=129"],
     "data.batch_size: must be divisible by workers=2"),
    ("train-no-workers", train_cli, lambda w, s: ["--workers", "0"], "workers: must be >= 1"),
    ("train-word-for-number", train_cli, lambda w, s: ["--set", "optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
    ("train-set-without-value", train_cli, lambda w, s: ["--set", "loss"], "--set 'loss': expected key=value"),
    ("train-missing-config", train_cli, lambda w, s: [str(s / "nope.yaml")], "nope.yaml' does not exist"),
    ("train-invalid-yaml", train_cli, lambda w, s: [write(s, "c.yaml", "paco: [\n")], "invalid YAML"),
    ("train-yaml-list", train_cli, lambda w, s: [write(s, "c.yaml", "- loss\n")], "expected a mapping at top level"),
    ("train-yaml-bad-section", train_cli, lambda w, s: [write(s, "c.yaml", "paco: 3\n")], "paco: expected a mapping"),
    ("evaluate-missing-checkpoint", evaluate_cli, lambda w, s: [str(s / "none")], "does not exist"),
    ("evaluate-garbage-checkpoint", evaluate_cli, lambda w, s: [garbage_checkpoint(s)], "is unreadable"),
    ("evaluate-foreign-checkpoint", evaluate_cli, lambda w, s: [foreign_checkpoint(s)], "lacks config"),
    ("tune-unknown-key", tune_cli, lambda w, s: [space(w, s, schedular={}), "--dry-run"],
     "unknown key schedular (did you mean scheduler?)"),
    ("tune-bad-primitive", tune_cli,
     lambda w, s: [space(w, s, search={"paco": {"alpha": {"loguniform": [0, 1]}}}), "--dry-run"],
     "search.paco.alpha: loguniform needs low > 0"),
    ("tune-int-key-float-range", tune_cli,
     lambda w, s: [space(w, s, search={"paco": {"queue_size": {"uniform": [10, 100]}}}), "--dry-run"],
     "paco.queue_size is int"),
    ("tune-search-resources", tune_cli,
     lambda w, s: [space(w, s, search={"workers": {"choice": [1, 2]}}), "--dry-run"], "search.workers: not searchable"),
    ("tune-experiment-exists", tune_cli, lambda w, s: [space(w, s)], "experiment"),
    ("tune-resume-nothing", tune_cli, lambda w, s: [space(w, s, name="never"), "--resume"], "--resume: no experiment"),
    ("pipeline-missing-source", fashion_mnist, lambda w, s: ["--src", str(s / "none"), "--out", str(s / "o")],
     "not found"),
    ("pipeline-truncated-idx", fashion_mnist, lambda w, s: ["--src", truncated_idx_root(s), "--out", str(s / "o"),
                                                           "--max-per-class", "20", "--val-per-class", "5"],
     "t10k-images-idx3-ubyte: IDX payload has"),
    ("pipeline-out-is-finished-run", fashion_mnist,
     lambda w, s: ["--src", str(make_fashion_root(s / "fm")[0]), "--out", str(w["ws"] / "runs"),
                   "--max-per-class", "20", "--val-per-class", "5"], "exists and is not a prepared dataset"),
    ("pipeline-label-not-integer", txt_list, lambda w, s: bad_label_list(s, "cat"), "label 'cat' is not an integer"),
    ("pipeline-label-negative", txt_list, lambda w, s: bad_label_list(s, "-3"), "label -3 outside"),
]


@pytest.mark.parametrize("name,command,argv,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_keeps_finished_work(name, command, argv, message, workspace, tmp_path, capsys):
    before = snapshot(workspace["ws"], workspace["dataset"])
    args = argv(workspace, tmp_path)
    capsys.readouterr()
    assert command.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert message in err, err
    assert snapshot(workspace["ws"], workspace["dataset"]) == before
    assert not list(tmp_path.glob("o")) and not list(tmp_path.glob(".o*"))  # no partial pipeline output


def test_the_table_is_broad():
    assert len(CASES) >= 20
    assert {c[1] for c in CASES} == {train_cli, evaluate_cli, tune_cli, fashion_mnist, txt_list}
