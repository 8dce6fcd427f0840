"""``rmt-fast`` command line: ``rmt-fast {demo,bench,flops,train,evaluate} ...``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": ("rmt_fast.demo", "main"), "bench": ("rmt_fast.bench.sweep", "main"),
                "flops": ("rmt_fast.bench.flops", "main"), "train": ("rmt_fast.train", "main"),
                "evaluate": ("rmt_fast.train", "evaluate_main")}
    if not argv or argv[0] not in commands:
        print(f"usage: rmt-fast {{{','.join(commands)}}} [options]", file=sys.stderr)
        return 2
    import importlib

    module, function = commands[argv[0]]
    getattr(importlib.import_module(module), function)(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
