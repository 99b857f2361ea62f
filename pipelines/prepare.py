"""``paco-prepare {fashion_mnist,cifar,txt_list} ARGS``: the pipeline of that name, as
``python -m pipelines.<name> ARGS`` runs it."""
from __future__ import annotations

import sys

PIPELINES = ("fashion_mnist", "cifar", "txt_list")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: paco-prepare {{{','.join(PIPELINES)}}} [--help | ARGS]"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv or argv[0] not in PIPELINES:
        print(f"{usage}\nerror: the first argument names the pipeline, got {argv[0] if argv else 'nothing'}",
              file=sys.stderr)
        return 2
    from . import cifar, fashion_mnist, txt_list

    return {"fashion_mnist": fashion_mnist, "cifar": cifar, "txt_list": txt_list}[argv[0]].main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
