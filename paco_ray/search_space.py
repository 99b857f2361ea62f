"""A search-space file: a base training config, Tune sampling primitives written as data, the ASHA
scheduler, per-trial resources and the checkpoint policy. Parsed and validated without Ray.

```yaml
base: {loss: paco, data: {...}, optim: {epochs: 15}}     # a training config (configs/*.yaml)
search:                                                 # values: {primitive: arguments}
  paco:
    temperature: {loguniform: [0.05, 0.3]}
    queue_size: {choice: [500, 1000, 3000]}
scheduler: {metric: val_balanced_acc, mode: max, max_t: 8, grace_period: 1, reduction_factor: 3}
num_samples: 8
max_concurrent_trials: 2                                # 0: as many as fit the cluster
resources: {workers: 1, cpus_per_worker: 1, use_gpu: false, trial_driver_cpus: 0.1}
checkpoints: {keep_per_trial: 1, keep_trials: 3}
storage_path: runs/tune                                 # local dir or s3:// gs:// URI
name: fashion_mnist_lt                                  # default: the file's stem
```
"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .capacity import HEAD_RESOURCE
from .config import TrainConfig
from .migrations import upgrade_renamed_keys, upgrade_space
from .schema import (NUMBER, ConfigError, apply_overrides, check, check_keys, coerce, field_type, flatten,
                     from_mapping, read_yaml_mapping, set_dotted)
from .storage import absolute_storage, check_no_credentials

# primitive -> number of arguments (None: a non-empty list of values)
PRIMITIVES = {"uniform": 2, "quniform": 3, "loguniform": 2, "qloguniform": 3,
              "randint": 2, "qrandint": 3, "lograndint": 2, "choice": None, "grid": None}
INTEGER_PRIMITIVES = ("randint", "qrandint", "lograndint", "choice", "grid")
METRICS = ("val_balanced_acc", "val_top1", "val_top5", "val_many", "val_medium", "val_few")
TOP_LEVEL = ["base", "search", "scheduler", "num_samples", "max_concurrent_trials", "resources",
             "checkpoints", "storage_path", "name", "search_seed", "search_alg", "tpe_startup_trials"]
SEARCH_ALGS = ("random", "optuna")  # Tune's BasicVariantGenerator (random and grid) | Optuna's TPE
# What --resume may change: how many trials run at once and on what (the cluster may have changed)
RESUME_MAY_CHANGE = ("max_concurrent_trials", "resources")
# Keys the search file sets in its own sections, not in base: or search:
MANAGED = {"workers": "resources.workers", "cpus_per_worker": "resources.cpus_per_worker",
           "use_gpu": "resources.use_gpu", "storage_path": "storage_path", "name": "name",
           "keep_checkpoints": "checkpoints.keep_per_trial"}


@dataclass
class Scheduler:
    metric: str = "val_balanced_acc"  # maximised: every metric is an accuracy
    max_t: int = 0  # epochs of a full trial (its cosine schedule); 0: base optim.epochs
    grace_period: int = 1
    reduction_factor: float = 3.0


@dataclass
class Resources:
    workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    trial_driver_cpus: float = 0.1  # the Tune trial actor that runs the TorchTrainer
    trial_driver_on_head: bool = True  # keep trial actors on the head, off the nodes added for workers

    def per_trial(self) -> dict[str, float]:
        need = {"CPU": self.workers * self.cpus_per_worker + self.trial_driver_cpus}
        if self.use_gpu:
            need["GPU"] = float(self.workers)
        return need

    def trial_driver(self) -> dict[str, float]:
        """The Tune trial actor's resources (Ray's head-node resource pins it to the head)."""
        return {"CPU": self.trial_driver_cpus, **({HEAD_RESOURCE: 0.001} if self.trial_driver_on_head else {})}


@dataclass
class Checkpoints:
    keep_per_trial: int = 1  # best N checkpoints of each trial, by the scheduler metric
    keep_trials: int = 3     # trials whose checkpoints survive the experiment; the rest are deleted


@dataclass
class SearchSpace:
    base: dict[str, Any]                      # the raw training config every trial starts from
    search: dict[str, tuple[str, Any]]        # dotted key -> (primitive, arguments)
    scheduler: Scheduler = field(default_factory=Scheduler)
    num_samples: int = 8
    max_concurrent_trials: int = 0
    resources: Resources = field(default_factory=Resources)
    checkpoints: Checkpoints = field(default_factory=Checkpoints)
    storage_path: str = "runs/tune"
    name: str = ""
    search_seed: int = 0
    search_alg: str = "random"
    tpe_startup_trials: int = 10  # search_alg optuna: trials TPE samples at random before it models results

    @property
    def experiment_path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def trial_config(self, sampled: dict[str, Any], epochs: int | None = None) -> TrainConfig:
        """The training config of one trial: base + sampled values + resources."""
        raw = copy.deepcopy(self.base)
        for key, value in flatten(sampled).items():
            set_dotted(raw, key, value)
        r = self.resources
        raw.update(workers=r.workers, cpus_per_worker=r.cpus_per_worker, use_gpu=r.use_gpu,
                   keep_checkpoints=self.checkpoints.keep_per_trial)
        set_dotted(raw, "optim.epochs", epochs or self.scheduler.max_t)
        return TrainConfig.from_dict(raw)

    def full_config(self) -> TrainConfig:
        """The base config at its full epoch budget (what --then-train retrains)."""
        return self.trial_config({}, epochs=self.base_epochs)

    @property
    def base_epochs(self) -> int:
        return TrainConfig.from_dict(self.base).optim.epochs

    def to_dict(self) -> dict[str, Any]:
        search: dict[str, Any] = {}
        for key, (primitive, args) in self.search.items():
            set_dotted(search, key, {primitive: args})
        return {"base": self.base, "search": search, "scheduler": dataclasses.asdict(self.scheduler),
                "num_samples": self.num_samples, "max_concurrent_trials": self.max_concurrent_trials,
                "resources": dataclasses.asdict(self.resources),
                "checkpoints": dataclasses.asdict(self.checkpoints), "storage_path": self.storage_path,
                "name": self.name, "search_seed": self.search_seed, "search_alg": self.search_alg,
                "tpe_startup_trials": self.tpe_startup_trials}

    def trial_count(self) -> int:
        """How many trials the search generates: ``num_samples`` times every grid's size."""
        return self.num_samples * math.prod(len(args) for primitive, args in self.search.values() if primitive == "grid")


# ----------------------------------------------------------------------------- helpers


def _is_section(dotted: str) -> bool:
    """Whether a dotted TrainConfig key names a section (raises for unknown keys)."""
    return dataclasses.is_dataclass(field_type(TrainConfig, dotted, "search."))


def _primitive(key: str, spec: dict[str, Any]) -> tuple[str, Any]:
    where = f"search.{key}"
    if len(spec) != 1 or next(iter(spec)) not in PRIMITIVES:
        names = ", ".join(PRIMITIVES)
        raise ConfigError(f"{where}: expected one sampling primitive ({names}), got {spec!r}")
    primitive, args = next(iter(spec.items()))
    arity = PRIMITIVES[primitive]
    if isinstance(args, list):  # YAML 1.1 reads 1e-3 as a string
        args = [float(a) if isinstance(a, str) and NUMBER.fullmatch(a.strip()) else a for a in args]
    if not isinstance(args, list) or (arity is None and not args) or (arity is not None and len(args) != arity):
        shape = "a non-empty list of values" if arity is None else f"a list of {arity} numbers"
        raise ConfigError(f"{where}: {primitive} takes {shape}, got {args!r}")
    if arity is not None:
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args):
            raise ConfigError(f"{where}: {primitive} takes numbers, got {args!r}")
        low, high = args[0], args[1]
        if not low < high:
            raise ConfigError(f"{where}: {primitive} needs low < high, got {args!r}")
        if primitive.startswith("log") or primitive == "qloguniform":
            if low <= 0:
                raise ConfigError(f"{where}: {primitive} needs low > 0, got {args!r}")
        if arity == 3 and args[2] <= 0:
            raise ConfigError(f"{where}: {primitive} needs a step q > 0, got {args!r}")
        if primitive in ("randint", "qrandint", "lograndint") and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: {primitive} takes integers, got {args!r}")
    return primitive, args


def _candidates(primitive: str, args: list) -> list[Any]:
    """Values that bound what the primitive can sample (every value of choice/grid)."""
    if PRIMITIVES[primitive] is None:
        return list(args)
    if primitive == "randint" or primitive == "lograndint":
        return [args[0], args[1] - 1]  # Tune's upper bound is exclusive
    return [args[0], args[1]]


# ----------------------------------------------------------------------------- parsing


def parse(raw: Any, source: str = "search space") -> SearchSpace:
    """Validate a raw search-space mapping; every error is one line naming the key. Values that
    depend on others (max_t 0, a relative storage path or data.path) are resolved here, once."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at top level")
    raw = upgrade_space(raw, Scheduler.metric)[0]
    check_keys(raw, TOP_LEVEL)
    base, base_cfg = _parse_base(raw.get("base"))
    scheduler = from_mapping(Scheduler, raw.get("scheduler"), "scheduler.")
    storage_path = coerce(raw.get("storage_path", "runs/tune"), str, "storage_path")
    space = SearchSpace(
        base=base, search=_parse_search(raw.get("search")),
        scheduler=dataclasses.replace(scheduler, max_t=scheduler.max_t or base_cfg.optim.epochs),
        num_samples=coerce(raw.get("num_samples", 8), int, "num_samples"),
        max_concurrent_trials=coerce(raw.get("max_concurrent_trials", 0), int, "max_concurrent_trials"),
        resources=from_mapping(Resources, raw.get("resources"), "resources."),
        checkpoints=from_mapping(Checkpoints, raw.get("checkpoints"), "checkpoints."),
        storage_path=absolute_storage(storage_path) if storage_path else "",
        name=coerce(raw.get("name", ""), str, "name"),
        search_seed=coerce(raw.get("search_seed", 0), int, "search_seed"),
        search_alg=coerce(raw.get("search_alg", "random"), str, "search_alg"),
        tpe_startup_trials=coerce(raw.get("tpe_startup_trials", 10), int, "tpe_startup_trials"),
    )
    _validate(space, base_cfg)
    return space


def _parse_base(base: Any) -> tuple[dict[str, Any], TrainConfig]:
    """The raw base config (renamed keys upgraded, data.path, model.pretrained and node_types
    absolute) and its validated config."""
    base = base or {}
    if not isinstance(base, dict):
        raise ConfigError(f"base: expected a training config mapping, got {base!r}")
    for key, home in MANAGED.items():
        if key in base:
            raise ConfigError(f"base.{key}: set it as {home} in a search space")
    try:
        base = copy.deepcopy(upgrade_renamed_keys(base)[0])
        base_cfg = TrainConfig.from_dict(base)
    except ConfigError as err:
        raise ConfigError(f"base: {err}") from None
    for key, value in (("data.path", base_cfg.data.path), ("model.pretrained", base_cfg.model.pretrained),
                       ("node_types", base_cfg.node_types)):
        if value:  # absolute: Tune changes the working directory
            set_dotted(base, key, absolute_storage(value))
    return base, base_cfg


def _parse_search(search_raw: Any) -> dict[str, tuple[str, Any]]:
    """``{dotted key: (primitive, arguments)}`` from nested or dotted ``search:`` entries."""
    if not isinstance(search_raw, dict) or not search_raw:
        raise ConfigError("search: expected a mapping of config keys to sampling primitives")
    search: dict[str, tuple[str, Any]] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if _is_section(dotted):
                if not isinstance(value, dict) or (len(value) == 1 and next(iter(value)) in PRIMITIVES):
                    raise ConfigError(f"search.{dotted}: is a section; search its keys (search.{dotted}.<key>)")
                walk(value, dotted + ".")
            elif isinstance(value, dict):
                if dotted in search:
                    raise ConfigError(f"search.{dotted}: given twice")
                search[dotted] = _primitive(dotted, value)
            else:
                raise ConfigError(f"search.{dotted}: expected a sampling primitive such as "
                                  f"{{choice: [...]}}, got {value!r}")

    walk(search_raw, "")
    return search


def _validate(space: SearchSpace, base_cfg: TrainConfig) -> None:
    """Check every value of a parsed space (changes nothing)."""
    s, r, c = space.scheduler, space.resources, space.checkpoints
    check(s.metric in METRICS, "scheduler.metric", f"must be one of {', '.join(METRICS)} (validation split only)",
          s.metric)
    check(1 <= s.max_t <= base_cfg.optim.epochs, "scheduler.max_t", f"must be in [1, base.optim.epochs="
          f"{base_cfg.optim.epochs}] (trial epochs; base.optim.epochs is the full budget)", s.max_t)
    check(1 <= s.grace_period <= s.max_t, "scheduler.grace_period", f"must be in [1, scheduler.max_t={s.max_t}]",
          s.grace_period)
    check(s.reduction_factor > 1, "scheduler.reduction_factor", "must be > 1", s.reduction_factor)
    check(space.num_samples >= 1, "num_samples", "must be >= 1", space.num_samples)
    check(space.search_alg in SEARCH_ALGS, "search_alg", f"must be one of {', '.join(SEARCH_ALGS)}", space.search_alg)
    check(space.tpe_startup_trials >= 1, "tpe_startup_trials", "must be >= 1", space.tpe_startup_trials)
    grids = [key for key, (primitive, _) in space.search.items() if primitive == "grid"]
    if space.search_alg == "optuna" and grids:
        raise ConfigError(f"search.{grids[0]}: grid is not a distribution TPE samples (search_alg: optuna); "
                          "use choice, or search_alg: random")
    check(space.max_concurrent_trials >= 0, "max_concurrent_trials", "must be >= 0 (0: as many as fit)",
          space.max_concurrent_trials)
    check(r.workers >= 1, "resources.workers", "must be >= 1", r.workers)
    check(r.cpus_per_worker > 0, "resources.cpus_per_worker", "must be > 0", r.cpus_per_worker)
    check(r.trial_driver_cpus > 0, "resources.trial_driver_cpus", "must be > 0 (Ray rejects 0)", r.trial_driver_cpus)
    check(c.keep_per_trial >= 1, "checkpoints.keep_per_trial", "must be >= 1", c.keep_per_trial)
    check(c.keep_trials >= 1, "checkpoints.keep_trials", "must be >= 1", c.keep_trials)
    check(bool(space.storage_path), "storage_path", "must not be empty", space.storage_path)
    check_no_credentials("storage_path", space.storage_path)
    check(bool(space.name) and "/" not in space.name, "name", "must be a non-empty name without '/'", space.name)
    try:
        space.trial_config({})
    except ConfigError as err:  # e.g. data.batch_size not divisible by resources.workers
        raise ConfigError(f"{err} (with resources.workers={r.workers})") from None
    for key, (primitive, args) in space.search.items():
        _validate_search_key(space, key, primitive, args)


def _validate_search_key(space: SearchSpace, key: str, primitive: str, args: Any) -> None:
    if key.split(".")[0] in MANAGED or key in ("max_failures", "log_level"):
        home = MANAGED.get(key.split(".")[0], "base")
        raise ConfigError(f"search.{key}: not searchable (set it in {home})")
    if key == "optim.epochs":
        raise ConfigError("search.optim.epochs: trial length is scheduler.max_t, not searchable")
    kind = field_type(TrainConfig, key, "search.")
    if kind is not float and primitive not in INTEGER_PRIMITIVES:
        raise ConfigError(f"search.{key}: {primitive} samples floats but {key} is {kind.__name__}; "
                          f"use {', '.join(INTEGER_PRIMITIVES) if kind is int else 'choice or grid'}")
    if kind in (bool, str) and primitive not in ("choice", "grid"):
        raise ConfigError(f"search.{key}: {key} is {kind.__name__}; use choice or grid")
    for value in _candidates(primitive, args):
        try:
            space.trial_config({key: value})
        except ConfigError as err:
            raise ConfigError(f"search.{key}: {primitive} value {value!r} is invalid ({err})") from None


def load_space(path: str | Path, overrides: list[str] | None = None) -> SearchSpace:
    """Read and validate a search-space YAML file plus ``key=value`` overrides. ``base:`` holds
    a training config, or names a training config file (relative to the space file, else to the
    working directory)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "search space")
    train_keys = sorted(set(raw) & {f.name for f in dataclasses.fields(TrainConfig)})
    if "base" not in raw and "search" not in raw and train_keys:
        raise ConfigError(f"{path}: a training config (it sets {', '.join(train_keys[:3])}), not a search space; "
                          f"train it with paco-train {path}, or search around it with a space whose base: is {path}")
    if isinstance(raw.get("base"), str):
        raw["base"] = read_yaml_mapping(base_file(path, raw["base"]), "base: training config")
    raw.setdefault("name", path.stem)
    raw, notes = upgrade_space(apply_overrides(raw, overrides or []), Scheduler.metric)
    for note in notes:
        sys.stderr.write(f"warning: {note}\n")
    return parse(raw, str(path))


def base_file(space_file: Path, name: str) -> Path:
    """``base: FILE`` relative to the space file's folder, or to the working directory."""
    beside = space_file.parent / name
    return beside if beside.is_file() or not Path(name).is_file() else Path(name)


def param_space(space: SearchSpace) -> dict[str, Any]:
    """The nested Tune param_space (``{"paco": {"temperature": tune.loguniform(...)}}``)."""
    from ray import tune

    builders = {"uniform": tune.uniform, "quniform": tune.quniform, "loguniform": tune.loguniform,
                "qloguniform": tune.qloguniform, "randint": tune.randint, "qrandint": tune.qrandint,
                "lograndint": tune.lograndint, "choice": tune.choice, "grid": tune.grid_search}
    tree: dict[str, Any] = {}
    for key, (primitive, args) in space.search.items():
        value = builders[primitive](args) if PRIMITIVES[primitive] is None else builders[primitive](*args)
        set_dotted(tree, key, value)
    return tree


def resolve_trials(space: SearchSpace) -> list[dict[str, Any]]:
    """The trial configs the search will create with ``search_seed`` (no Ray cluster): all of
    them for random and grid search; for TPE the first ones, sampled before any result."""
    if space.search_alg == "optuna":
        from .search_algorithms import searcher

        tpe = searcher("optuna", space.search_seed, space.num_samples, space.tpe_startup_trials)
        tpe.set_search_properties(space.scheduler.metric, "max", param_space(space))
        return [tpe.suggest(f"dry-run-{i}") for i in range(min(space.num_samples, space.tpe_startup_trials))]
    from ray.tune.search.sample import _BackwardsCompatibleNumpyRng
    from ray.tune.search.variant_generator import generate_variants

    rng = _BackwardsCompatibleNumpyRng(space.search_seed)
    spec = {"config": param_space(space)}
    trials = []
    for _ in range(space.num_samples):
        for _, resolved in generate_variants(copy.deepcopy(spec), random_state=rng):
            trials.append(resolved["config"])
    return trials
