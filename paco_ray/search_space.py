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
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from .config import (_NUMBER, ConfigError, TrainConfig, _absolute_storage, _coerce, apply_overrides, check_no_credentials, flatten,
                     read_yaml_mapping)

# primitive -> number of arguments (None: a non-empty list of values)
PRIMITIVES = {"uniform": 2, "quniform": 3, "loguniform": 2, "qloguniform": 3,
              "randint": 2, "qrandint": 3, "lograndint": 2, "choice": None, "grid": None}
INTEGER_PRIMITIVES = ("randint", "qrandint", "lograndint", "choice", "grid")
METRICS = ("val_balanced_acc", "val_top1", "val_top5", "val_many", "val_medium", "val_few")
TOP_LEVEL = ("base", "search", "scheduler", "num_samples", "max_concurrent_trials", "resources",
             "checkpoints", "storage_path", "name", "search_seed")
# Keys the search file sets in its own sections, not in base: or search:
MANAGED = {"workers": "resources.workers", "cpus_per_worker": "resources.cpus_per_worker",
           "use_gpu": "resources.use_gpu", "storage_path": "storage_path", "name": "name",
           "keep_checkpoints": "checkpoints.keep_per_trial"}


@dataclass
class Scheduler:
    metric: str = "val_balanced_acc"
    mode: str = "max"
    max_t: int = 0  # epochs of a full trial (its cosine schedule); 0: base optim.epochs
    grace_period: int = 1
    reduction_factor: float = 3.0


@dataclass
class Resources:
    workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    trial_driver_cpus: float = 0.1  # the Tune trial actor that runs the TorchTrainer

    def per_trial(self) -> dict[str, float]:
        need = {"CPU": self.workers * self.cpus_per_worker + self.trial_driver_cpus}
        if self.use_gpu:
            need["GPU"] = float(self.workers)
        return need


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

    @property
    def experiment_path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def trial_config(self, sampled: dict[str, Any], epochs: int | None = None) -> TrainConfig:
        """The training config of one trial: base + sampled values + resources."""
        raw = copy.deepcopy(self.base)
        for key, value in flatten(sampled).items():
            _set(raw, key, value)
        r = self.resources
        raw.update(workers=r.workers, cpus_per_worker=r.cpus_per_worker, use_gpu=r.use_gpu,
                   keep_checkpoints=self.checkpoints.keep_per_trial)
        _set(raw, "optim.epochs", epochs or self.scheduler.max_t)
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
            _set(search, key, {primitive: args})
        return {"base": self.base, "search": search, "scheduler": dataclasses.asdict(self.scheduler),
                "num_samples": self.num_samples, "max_concurrent_trials": self.max_concurrent_trials,
                "resources": dataclasses.asdict(self.resources),
                "checkpoints": dataclasses.asdict(self.checkpoints), "storage_path": self.storage_path,
                "name": self.name, "search_seed": self.search_seed}


# ----------------------------------------------------------------------------- helpers


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _field_type(dotted: str, where: str) -> type:
    """The Python type of a TrainConfig key; unknown keys raise with a suggestion."""
    cls: Any = TrainConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            prefix = ".".join(parts[:i])
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean {where}.{prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"{where}.{dotted}: unknown config key{hint}")
        cls = hints[part]
        if not dataclasses.is_dataclass(cls) and i < len(parts) - 1:
            raise ConfigError(f"{where}.{dotted}: {'.'.join(parts[:i + 1])} is not a section")
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"{where}.{dotted}: is a section; search its keys ({where}.{dotted}.<key>)")
    return cls


def _is_section(dotted: str) -> bool:
    """Whether a dotted TrainConfig path names a section (raises for unknown keys)."""
    try:
        _field_type(dotted, "search")
    except ConfigError as err:
        if "is a section" in str(err):
            return True
        raise
    return False


def _build_section(cls: type, raw: Any, key: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for name, value in raw.items():
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            raise ConfigError(f"unknown key {key}.{name}" + (f" (did you mean {key}.{close[0]}?)" if close else ""))
        values[name] = _coerce(value, hints[name], f"{key}.{name}")
    return cls(**values)


def _primitive(key: str, spec: dict[str, Any]) -> tuple[str, Any]:
    where = f"search.{key}"
    if len(spec) != 1 or next(iter(spec)) not in PRIMITIVES:
        names = ", ".join(PRIMITIVES)
        raise ConfigError(f"{where}: expected one sampling primitive ({names}), got {spec!r}")
    primitive, args = next(iter(spec.items()))
    arity = PRIMITIVES[primitive]
    if isinstance(args, list):  # YAML 1.1 reads 1e-3 as a string
        args = [float(a) if isinstance(a, str) and _NUMBER.fullmatch(a.strip()) else a for a in args]
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
    """Validate a raw search-space mapping; every error is one line naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at top level")
    for key in raw:
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(str(key), TOP_LEVEL, n=1)
            raise ConfigError(f"unknown key {key}" + (f" (did you mean {close[0]}?)" if close else ""))

    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"base: expected a training config mapping, got {base!r}")
    for key, home in MANAGED.items():
        if key in base:
            raise ConfigError(f"base.{key}: set it as {home} in a search space")
    try:
        base_cfg = TrainConfig.from_dict(base)
    except ConfigError as err:
        raise ConfigError(f"base: {err}") from None
    base = copy.deepcopy(base)
    if base_cfg.data.path:  # absolute: Tune changes the working directory
        _set(base, "data.path", str(Path(base_cfg.data.path).expanduser().resolve()))

    search_raw = raw.get("search")
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

    space = SearchSpace(
        base=base, search=search,
        scheduler=_build_section(Scheduler, raw.get("scheduler"), "scheduler"),
        num_samples=_coerce(raw.get("num_samples", 8), int, "num_samples"),
        max_concurrent_trials=_coerce(raw.get("max_concurrent_trials", 0), int, "max_concurrent_trials"),
        resources=_build_section(Resources, raw.get("resources"), "resources"),
        checkpoints=_build_section(Checkpoints, raw.get("checkpoints"), "checkpoints"),
        storage_path=_coerce(raw.get("storage_path", "runs/tune"), str, "storage_path"),
        name=_coerce(raw.get("name", ""), str, "name"),
        search_seed=_coerce(raw.get("search_seed", 0), int, "search_seed"),
    )
    _validate(space, base_cfg)
    return space


def _validate(space: SearchSpace, base_cfg: TrainConfig) -> None:
    s, r, c = space.scheduler, space.resources, space.checkpoints
    if s.metric not in METRICS:
        raise ConfigError(f"scheduler.metric: must be one of {', '.join(METRICS)} (validation split only), "
                          f"got {s.metric!r}")
    if s.mode != "max":
        raise ConfigError(f"scheduler.mode: {s.metric} is an accuracy and is maximised, got {s.mode!r}")
    if s.max_t == 0:
        s.max_t = base_cfg.optim.epochs
    if not 1 <= s.max_t <= base_cfg.optim.epochs:
        raise ConfigError(f"scheduler.max_t: must be in [1, base.optim.epochs={base_cfg.optim.epochs}] "
                          f"(trial epochs; base.optim.epochs is the full budget), got {s.max_t}")
    if not 1 <= s.grace_period <= s.max_t:
        raise ConfigError(f"scheduler.grace_period: must be in [1, scheduler.max_t={s.max_t}], got {s.grace_period}")
    if not s.reduction_factor > 1:
        raise ConfigError(f"scheduler.reduction_factor: must be > 1, got {s.reduction_factor:g}")
    if space.num_samples < 1:
        raise ConfigError(f"num_samples: must be >= 1, got {space.num_samples}")
    if space.max_concurrent_trials < 0:
        raise ConfigError(f"max_concurrent_trials: must be >= 0 (0: as many as fit), got {space.max_concurrent_trials}")
    if r.workers < 1:
        raise ConfigError(f"resources.workers: must be >= 1, got {r.workers}")
    if r.cpus_per_worker <= 0:
        raise ConfigError(f"resources.cpus_per_worker: must be > 0, got {r.cpus_per_worker:g}")
    if r.trial_driver_cpus <= 0:
        raise ConfigError(f"resources.trial_driver_cpus: must be > 0 (Ray rejects 0), got {r.trial_driver_cpus:g}")
    if c.keep_per_trial < 1:
        raise ConfigError(f"checkpoints.keep_per_trial: must be >= 1, got {c.keep_per_trial}")
    if c.keep_trials < 1:
        raise ConfigError(f"checkpoints.keep_trials: must be >= 1, got {c.keep_trials}")
    if not space.storage_path:
        raise ConfigError("storage_path: must not be empty")
    check_no_credentials("storage_path", space.storage_path)
    space.storage_path = _absolute_storage(space.storage_path)
    if not space.name or "/" in space.name:
        raise ConfigError(f"name: must be a non-empty name without '/', got {space.name!r}")

    try:
        space.trial_config({})
    except ConfigError as err:  # e.g. data.batch_size not divisible by resources.workers
        raise ConfigError(f"{err} (with resources.workers={r.workers})") from None

    for key, (primitive, args) in space.search.items():
        if key.split(".")[0] in MANAGED or key in ("max_failures", "log_level"):
            home = MANAGED.get(key.split(".")[0], "base")
            raise ConfigError(f"search.{key}: not searchable (set it in {home})")
        if key == "optim.epochs":
            raise ConfigError("search.optim.epochs: trial length is scheduler.max_t, not searchable")
        kind = _field_type(key, "search")
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
    """Read and validate a search-space YAML file plus ``key=value`` overrides."""
    path = Path(path)
    raw = read_yaml_mapping(path, "search space")
    raw.setdefault("name", path.stem)
    return parse(apply_overrides(raw, overrides or []), str(path))


def param_space(space: SearchSpace) -> dict[str, Any]:
    """The nested Tune param_space (``{"paco": {"temperature": tune.loguniform(...)}}``)."""
    from ray import tune

    builders = {"uniform": tune.uniform, "quniform": tune.quniform, "loguniform": tune.loguniform,
                "qloguniform": tune.qloguniform, "randint": tune.randint, "qrandint": tune.qrandint,
                "lograndint": tune.lograndint, "choice": tune.choice, "grid": tune.grid_search}
    tree: dict[str, Any] = {}
    for key, (primitive, args) in space.search.items():
        value = builders[primitive](args) if PRIMITIVES[primitive] is None else builders[primitive](*args)
        _set(tree, key, value)
    return tree


def resolve_trials(space: SearchSpace) -> list[dict[str, Any]]:
    """The trial configs Tune's BasicVariantGenerator will create with ``search_seed`` (no Ray cluster)."""
    from ray.tune.search.sample import _BackwardsCompatibleNumpyRng
    from ray.tune.search.variant_generator import generate_variants

    rng = _BackwardsCompatibleNumpyRng(space.search_seed)
    spec = {"config": param_space(space)}
    trials = []
    for _ in range(space.num_samples):
        for _, resolved in generate_variants(copy.deepcopy(spec), random_state=rng):
            trials.append(resolved["config"])
    return trials
