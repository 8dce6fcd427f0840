"""Train the pretrained MiniLM-L6 encoder RMT on bAbI facts hidden in real English (issue 15).

A thin front end of :mod:`rmt_fast.train_qa` (all its options apply; ``--help``). The runs behind
``docs/results.md``, one CPU thread each, in this order::

    # memorize: fact at the start; curriculum 1 -> 2 -> 4 -> 8 segments of 128 tokens
    python scripts/train_minilm_babi.py --task memorize --out /tmp/minilm_runs/memorize \\
        --lrs 5e-4,5e-4,3e-4,2e-4 --threads 1
    # detect and memorize: starts from memorize's final model
    python scripts/train_minilm_babi.py --task detect --out /tmp/minilm_runs/detect \\
        --init-from /tmp/minilm_runs/memorize/final --curriculum 2,4,8 --lrs 3e-4,3e-4,2e-4 --threads 1
    # reasoning (two qa4 facts): from the pretrained model
    python scripts/train_minilm_babi.py --task reasoning --out /tmp/minilm_runs/reasoning \\
        --threshold 0.95 --stage-steps 1500 --threads 1

Started again with the same ``--out``, a run resumes from its latest checkpoint.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rmt_fast.train_qa import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
