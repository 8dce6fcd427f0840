"""One figure of several ``babi_eval`` results (accuracy vs input length, no-memory baselines
dotted), as the 1M-token report's Figure 1 puts its three tasks side by side::

    python scripts/plot_babi_tasks.py docs/minilm_babi/tasks_lengths.png \\
        memorize=docs/minilm_babi/memorize_lengths.json detect=docs/minilm_babi/detect_lengths.json \\
        reasoning=docs/minilm_babi/reasoning_lengths.json
"""

import argparse
import json

from rmt_fast.tasks.babi_eval import plot_tasks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the PNG to write")
    p.add_argument("results", nargs="+", metavar="LABEL=JSON", help="a babi_lengths.json and its label")
    a = p.parse_args(argv)
    results = {}
    for item in a.results:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            p.error(f"results: expected LABEL=JSON, got {item!r}")
        with open(path) as f:
            results[label] = json.load(f)
    plot_tasks(results, a.out)
    print(a.out)


if __name__ == "__main__":
    main()
