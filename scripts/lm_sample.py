#!/usr/bin/env python3
"""A text sample from a trained row of ``lm_xl_comparison.py``, generated past its segments.

The prompt is the start of the first test document; ``generate(..., roll_segments=True)`` writes
every full 128-byte segment into memory (and the XL cache) and goes on in a new one, as the model
read text in training. Prints the prompt's tail and the sample::

    python scripts/lm_sample.py --out /tmp/rmt_runs/lm_long --row rmt-xl10-adjacent
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_xl_comparison import ROWS, _row_model  # noqa: E402

from rmt_fast.tasks.text_corpus import BOS, load_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the runs directory of lm_xl_comparison.py")
    p.add_argument("--row", default="rmt-xl10-adjacent", choices=sorted(ROWS))
    p.add_argument("--prompt-bytes", type=int, default=700)
    p.add_argument("--new-bytes", type=int, default=600)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, step, _ = _row_model(a.out, a.row)
    doc = load_corpus()["test"].document(0)
    prompt = torch.tensor([[BOS] + doc[:a.prompt_bytes].tolist()])
    torch.manual_seed(a.seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new = model.eval().generate(prompt, roll_segments=True, max_new_tokens=a.new_bytes,
                                    do_sample=True, temperature=a.temperature, top_k=a.top_k,
                                    pad_token_id=BOS, eos_token_id=BOS)
    text = bytes(t for t in new[0].tolist() if t < 256).decode("utf-8", "replace")
    tail = bytes(doc[max(0, a.prompt_bytes - 200):a.prompt_bytes].tolist()).decode("utf-8", "replace")
    report = (f"# {a.row}, step {step}: {new.shape[1]} new bytes, temperature {a.temperature}, "
              f"top-k {a.top_k}, seed {a.seed}\n\n## the prompt's last 200 bytes\n\n```\n{tail}\n```"
              f"\n\n## generated\n\n```\n{text}\n```\n")
    print(report)
    return report


if __name__ == "__main__":
    main()
