"""Accuracy vs input length (1 segment to 1,000,000+ tokens) of a model trained by
``scripts/train_minilm_babi.py``, with the no-memory baseline and peak RSS: a front end of
:mod:`rmt_fast.tasks.babi_eval` (``--help``). For example::

    python scripts/eval_minilm_babi.py --checkpoint /tmp/minilm_runs/memorize_robust/final \\
        --task memorize --trained-segments 32 --threads 1 --out results/minilm_babi/memorize

A stopped evaluation resumes: finished lengths are read back from ``babi_lengths.json``.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rmt_fast.tasks.babi_eval import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
