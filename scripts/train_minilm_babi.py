"""Train the pretrained MiniLM-L6 encoder RMT on bAbI facts hidden in real English (issue 15).

A thin front end of :mod:`rmt_fast.train_qa` (all its options apply; ``--help``). The runs of
docs/minilm_babi.md, one CPU thread each, at most two at a time::

    R=/tmp/minilm_runs
    # memorize: fact at the start; curriculum 1 -> 2 -> 4 -> 8 segments of 128 tokens
    python scripts/train_minilm_babi.py --task memorize --out $R/memorize \
        --lrs 5e-4,5e-4,3e-4,2e-4 --threads 1
    # detect and memorize: from memorize's final model
    python scripts/train_minilm_babi.py --task detect --out $R/detect \
        --init-from $R/memorize/final --curriculum 2,4,8 --lrs 3e-4,3e-4,2e-4 --threads 1
    # length robustness (for 1M tokens): memory noise 0.2 on a mix of 8/16/32 segments, TBPTT 8
    ROBUST="--curriculum 8,16,32 --mix --memory-noise 0.2 --bptt-depth 8 --batch-size 8 --lr 2e-4
            --warmup 10 --stage-steps 300 --threshold 0.98 --no-early-stop --eval-every 25
            --eval-size 64 --probe-size 32 --save-every 10"
    python scripts/train_minilm_babi.py --task memorize --out $R/memorize_robust \
        --init-from $R/memorize/final $ROBUST --threads 1
    python scripts/train_minilm_babi.py --task detect --out $R/detect_robust \
        --init-from $R/detect/final $ROBUST --threads 1
    # reasoning (two qa4 facts): from the pretrained model
    python scripts/train_minilm_babi.py --task reasoning --out $R/reasoning \
        --threshold 0.95 --stage-steps 1500 --threads 1

Started again with the same ``--out``, a run resumes from its latest checkpoint.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rmt_fast.train_qa import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
