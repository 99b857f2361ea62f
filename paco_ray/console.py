"""Console scripts (``pyproject.toml``): ``paco-train``, ``paco-tune``, ``paco-eval``,
``paco-prepare`` and ``paco-import``, the same commands as ``python -m paco_ray.train`` etc. Options are read before
the heavy modules load, so ``--help`` answers at once."""
from __future__ import annotations

import sys

PIPELINES = ("fashion_mnist", "cifar", "txt_list")


def train() -> int:
    from .commands import train_parser

    train_parser().parse_args()
    from .train import main

    return main()


def tune() -> int:
    from .commands import tune_parser

    tune_parser().parse_args()
    from .tune import main

    return main()


def evaluate() -> int:
    from .commands import evaluate_parser

    evaluate_parser().parse_args()
    from .evaluate import main

    return main()


def import_official() -> int:
    """``paco-import OFFICIAL.pth --config CONFIG.yaml --out CKPT`` (paco_ray.official)."""
    from .official import main

    return main()


def prepare(argv: list[str] | None = None) -> int:
    """``paco-prepare {fashion_mnist,cifar,txt_list} ARGS``: the pipeline of that name."""
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: paco-prepare {{{','.join(PIPELINES)}}} [--help | ARGS]"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv or argv[0] not in PIPELINES:
        print(f"{usage}\nerror: the first argument names the pipeline, got {argv[0] if argv else 'nothing'}",
              file=sys.stderr)
        return 2
    from pipelines import cifar, fashion_mnist, txt_list

    return {"fashion_mnist": fashion_mnist, "cifar": cifar, "txt_list": txt_list}[argv[0]].main(argv[1:])
