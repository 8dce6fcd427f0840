"""Where ARMT's own rule with ``state_decay=0.5`` (seed 0) first turns non-finite.

Resumes the run from a copy of its last finite checkpoint (training is deterministic), logs
every associative read and write of each training step, and prints the failing step's log when
the trainer's non-finite guard stops it (``nan_forensic_seed0_step778.txt``). Usage, with the
training's own arguments (docs/armt.md, "A decay of the state", ARMT's own rule)::

    python docs/armt/qa1_1fact_32mix_decay/armt_rule/nan_forensic.py --model armt --d-mem 32 \
        --armt-l2-norm --armt-state-decay 0.5 $COMMON --out COPY_OF_THE_RUN_WITH_CHECKPOINT_700
"""

import sys

import torch

import rmt_fast.models.armt as armt
import rmt_fast.train as tr
from rmt_fast.ops.associative_memory.reference import features

LOG = []  # per call: kind, rows, max|A|, max|z|, smallest normaliser, ..., finite
_read, _write, _acc = armt.associative_read, armt.associative_write, tr._accumulate


def read(x, A, z, **kw):
    out = _read(x, A, z, **kw)
    with torch.no_grad():
        q = features(x.float(), kw.get("nu", 3), kw.get("normalize", False))
        den = torch.einsum("blk,bk->bl", q, z.float()) + kw.get("eps", 1e-5)
        LOG.append(("read", x.shape[1], float(A.abs().max()), float(z.abs().max()), float(den.min()),
                    float(den.median()), float(out.abs().max()), bool(torch.isfinite(out).all())))
    return out


def write(km, v, beta, A, z, **kw):
    A2, z2 = _write(km, v, beta, A, z, **kw)
    with torch.no_grad():
        k = features(km.float(), kw.get("nu", 3), kw.get("normalize", False))
        den = torch.einsum("bmk,bk->bm", k, z.float() * kw.get("decay", 1.0)) + kw.get("eps", 1e-5)
        LOG.append(("write", km.shape[1], float(A2.abs().max()), float(z2.abs().max()), float(den.min()),
                    float(v.abs().max()), float(beta.max()), bool(torch.isfinite(A2).all())))
    return A2, z2


def accumulate(*args, **kwargs):
    LOG.clear()  # one training step's calls
    return _acc(*args, **kwargs)


armt.associative_read, armt.associative_write, tr._accumulate = read, write, accumulate
try:
    tr.main(sys.argv[1:])
except FloatingPointError as e:
    print(e)
    bad = next((i for i, r in enumerate(LOG) if not r[-1]), None)
    print("calls in the failing step:", len(LOG), "first non-finite:", bad)
    lo = 0 if bad is None else max(0, bad - 12)
    print("kind rows max|A| max|z| den_min den_median/|v|max out_max/beta_max finite")
    for i, r in enumerate(LOG[lo:(bad or 40) + 4], lo):
        print(i, r[0], r[1], *(f"{x:.3g}" for x in r[2:-1]), r[-1])
    print("every read of the failing step: index, max|A|, max|z|, den_min, out_max")
    for i, r in enumerate(LOG):
        if r[0] == "read":
            print(i, f"{r[2]:.3g} {r[3]:.3g} {r[4]:.3g} {r[6]:.3g}", end=" | ")
    print()
    reads = [r for r in LOG if r[0] == "read" and r[-1]]
    print(f"finite reads: min den {min(r[4] for r in reads):.3g}, "
          f"max |A| {max(r[2] for r in reads):.3g}, max out {max(r[6] for r in reads):.3g}")
