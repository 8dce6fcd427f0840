"""``rmt-fast`` command line: ``rmt-fast {demo,bench,flops,train,evaluate} ...``."""

from __future__ import annotations

import importlib
import sys

#: command -> (module, function, one-line description)
COMMANDS = {
    "demo": ("rmt_fast.demo", "main", "read million-token haystacks with a trained RMT and answer"),
    "train": ("rmt_fast.train", "main", "train an RMT on a task (curriculum, checkpoints, torchrun)"),
    "evaluate": ("rmt_fast.train", "evaluate_main", "score a training run's checkpoint on a split"),
    "bench": ("rmt_fast.bench.sweep", "main", "throughput and memory vs length, ours vs the peers"),
    "flops": ("rmt_fast.bench.flops", "main", "forward FLOPs of RMT vs full attention"),
}


def usage() -> str:
    from rmt_fast import __version__

    lines = [f"rmt-fast {__version__}: kernel-accelerated Recurrent Memory Transformer", "",
             "usage: rmt-fast COMMAND [options]   (rmt-fast COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv and argv[0] == "--version":
        from rmt_fast import __version__

        print(__version__)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        if argv:
            print(f"\nrmt-fast: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[argv[0]]
    getattr(importlib.import_module(module), function)(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
