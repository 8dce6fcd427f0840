"""Decoding speed of the bench's RMT models: ``python scripts/decode_speed.py``.

For the ``gpt2-small`` and ``default`` bench configurations (:mod:`rmt_fast.bench.systems`,
weights from seed 0), float32 and bf16, one thread: ``generate`` 48 new tokens (greedy) after a
prompt of two segments + 100 tokens (so the last segment and the new tokens fit the base model's
positions), best of 3 by thread CPU time, minus one generation of a single token (the prompt's
read), gives the decoding rate. To compare two builds, run it with ``PYTHONPATH`` pointing at a
``git worktree`` of the other commit with its extension built in place
(``python setup.py build_ext --inplace``), alternating the two.
"""

import time

import torch

from rmt_fast.bench.systems import CONFIGS, _rmt

NEW_TOKENS = 48


def _generate_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.thread_time()
    model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    return time.thread_time() - start


def main() -> dict:
    torch.set_num_threads(1)
    rates = {}
    for name in ("gpt2-small", "default"):
        cfg = CONFIGS[name]
        torch.manual_seed(0)
        model = _rmt(cfg, checkpoint=False).eval()
        prompt = torch.randint(1, cfg.vocab, (1, 2 * cfg.segment + 100),
                               generator=torch.Generator().manual_seed(0))
        for dtype in (torch.float32, torch.bfloat16):
            model = model.to(dtype)

            with torch.no_grad():
                _generate_s(model, prompt, 4)
                best = min(_generate_s(model, prompt, NEW_TOKENS) for _ in range(3))
                first = _generate_s(model, prompt, 1)
            rates[(name, str(dtype))] = (NEW_TOKENS - 1) / (best - first)
            print(f"{name} {dtype}: {NEW_TOKENS} new tokens {best:.3f} s, one new token {first:.3f} s "
                  f"-> {rates[(name, str(dtype))]:.1f} tokens/s decoding", flush=True)
    return rates


if __name__ == "__main__":
    main()
