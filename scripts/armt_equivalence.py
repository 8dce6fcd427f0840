"""Check rmt_fast's ARMT against the reference ARMT code on a GPT-2 config.

The reference is NOT part of rmt_fast: fetch it yourself, e.g.

    git clone https://github.com/RodkinIvan/associative-recurrent-memory-transformer /tmp/armt_ref_repo
    python scripts/armt_equivalence.py --reference /tmp/armt_ref_repo/modeling_amt/language_modeling.py

The script loads that file as a module (with the small shims below), builds the same random GPT-2
twice (one for the reference's ``AssociativeMemoryCell``/``AssociativeRecurrentWrapper``, one for
:class:`rmt_fast.models.armt.ARMTForCausalLM`), gives the reference's associative weights random
values (``W_mv`` starts at zero, which would keep the memory empty), copies every weight over with
``load_official_state_dict``, and compares logits, loss and every parameter's gradient in float32
(``--dtype float64`` shows that the remaining differences are rounding). Exit status 0 when all
are within ``--tol`` (default 1e-5, absolute). float32 rounding differences grow over the
segments where the read's normaliser is small; ``--seed`` picks other random instances.

Shims (the reference targets transformers 4.x; nothing of its logic is changed):
* ``wandb`` (imported, unused here) is a stub module when not installed;
* transformers 5.x calls GPT-2 blocks with positional arguments and blocks return a tensor, where
  the reference's ``AssociativeLayerWrapper.forward(hidden_states, **kwargs)`` expects keyword
  arguments and a tuple: each wrapper is put between two thin adapters that translate the calling
  convention only (positional -> keyword in, tensor -> 1-tuple out of the block, and back).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import os
import sys
import time
import types

if "triton" in sys.argv[1:] and os.environ.get("CUDA_VISIBLE_DEVICES", "") == "" \
        and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: the kernels run under the interpreter

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_reference(path: str):
    if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
        sys.modules["wandb"] = types.ModuleType("wandb")  # shim: imported but unused
    spec = importlib.util.spec_from_file_location("armt_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("AssociativeMemoryCell", "AssociativeRecurrentWrapper", "AssociativeLayerWrapper"):
        if not hasattr(module, name):
            raise SystemExit(f"{path} has no {name}: is it modeling_amt/language_modeling.py?")
    return module


class _BlockReturnsTuple(nn.Module):
    """Shim: the transformers-5 block (returns a tensor) as the reference expects it (a tuple)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden_states, **kwargs):
        out = self.block(hidden_states, **kwargs)
        return out if isinstance(out, tuple) else (out,)


class _KeywordCall(nn.Module):
    """Shim: the reference wrapper called by transformers 5 (positional arguments, tensor out)."""

    def __init__(self, wrapper: nn.Module, block_params: list[str]):
        super().__init__()
        self.wrapper, self.params = wrapper, block_params

    def forward(self, hidden_states, *args, **kwargs):
        kwargs.update(dict(zip(self.params, args, strict=False)))
        out = self.wrapper(hidden_states, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    # the reference's cell drives its layers through these
    def zero_mem(self):
        self.wrapper.zero_mem()

    @property
    def generate_mode(self):
        return self.wrapper.generate_mode

    @generate_mode.setter
    def generate_mode(self, value):
        self.wrapper.generate_mode = value


def adapt_layers(cell, layers_attr: str = "transformer.h") -> None:
    owner = cell.model
    for attr in layers_attr.split("."):
        owner = getattr(owner, attr)
    for i, wrapper in enumerate(owner):
        params = list(inspect.signature(wrapper.layer.forward).parameters)[1:]
        wrapper.layer = _BlockReturnsTuple(wrapper.layer)
        owner[i] = _KeywordCall(wrapper, params)  # cell.layers is this same ModuleList


def official_name(name: str) -> str:
    """Our parameter name -> the reference wrapper's (for comparing gradients)."""
    import re

    if name == "memory":
        return "memory_cell.memory"
    m = re.match(r"assoc\.(\d+)\.(.+)$", name)
    if m:
        return f"memory_cell.model.transformer.h.{m.group(1)}.wrapper.{m.group(2)}"
    m = re.match(r"base\.transformer\.h\.(\d+)\.(.+)$", name)
    if m:
        return f"memory_cell.model.transformer.h.{m.group(1)}.wrapper.layer.block.{m.group(2)}"
    return "memory_cell.model." + name.removeprefix("base.")


def run(args) -> int:
    from transformers import GPT2Config, GPT2LMHeadModel

    from rmt_fast.models.armt import ARMTForCausalLM

    ref_mod = load_reference(args.reference)
    # float64 shows the semantics are identical (differences at rounding level only); float32 is
    # the acceptance check. The reference creates its state with the default dtype.
    torch.set_default_dtype(getattr(torch, args.dtype))
    torch.manual_seed(args.seed)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.positions, n_embd=args.d_model,
                     n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    base = GPT2LMHeadModel(cfg).eval()
    ref_base, our_base = copy.deepcopy(base), copy.deepcopy(base)

    cell = ref_mod.AssociativeMemoryCell(ref_base, num_mem_tokens=args.mem, d_mem=args.d_mem,
                                         wrap_pos=args.wrap_pos, correction=not args.no_correction)
    adapt_layers(cell)
    ref = ref_mod.AssociativeRecurrentWrapper(cell, segment_size=args.segment,
                                              max_n_segments=args.segments + 1).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():  # W_mv is zero-initialised: give every associative weight a value
        for name, p in ref.named_parameters():
            if ".W_m" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * args.assoc_std)

    ours = ARMTForCausalLM(our_base, num_mem_tokens=args.mem, d_mem=args.d_mem,
                           segment_size=args.segment, correction=not args.no_correction,
                           position_mode="wrap" if args.wrap_pos else "model",
                           backend=args.backend).eval()
    official = {k.replace(".wrapper.layer.block.", ".layer.").replace(".wrapper.", "."): v
                for k, v in ref.state_dict().items()}  # the reference's own key names
    ours.load_official_state_dict(official)

    total = args.segment * args.segments - args.segment // 3  # a short last segment
    ids = torch.randint(0, args.vocab, (args.batch, total), generator=gen)
    mask = torch.ones_like(ids)  # the reference needs an attention mask to drop its prev_attn_mask
    t0 = time.perf_counter()
    ref_out = ref(input_ids=ids, labels=ids, attention_mask=mask)
    ref_out["loss"].backward()
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    our_out = ours(ids, labels=ids)
    our_out.loss.backward()
    t_ours = time.perf_counter() - t0

    ref_params = dict(ref.named_parameters())
    rows = []
    logit_err = (our_out.logits - ref_out["logits"]).abs().max().item()
    loss_err = abs(our_out.loss.item() - ref_out["loss"].item())
    rows.append(("logits", logit_err, ref_out["logits"].abs().max().item()))
    rows.append(("loss", loss_err, abs(ref_out["loss"].item())))
    grad_err, grad_scale, worst = 0.0, 0.0, ""
    n_grads = 0
    for name, p in ours.named_parameters():
        rp = ref_params.get(official_name(name))
        if rp is None:
            if name == "base.lm_head.weight":  # tied to wte
                continue
            raise SystemExit(f"no reference parameter for {name} ({official_name(name)})")
        if p.grad is None and rp.grad is None:
            continue
        g, rg = p.grad, rp.grad
        if g is None or rg is None:
            raise SystemExit(f"gradient of {name}: ours {'None' if g is None else 'set'}, "
                             f"reference {'None' if rg is None else 'set'}")
        err = (g - rg).abs().max().item()
        n_grads += 1
        grad_scale = max(grad_scale, rg.abs().max().item())
        if err >= grad_err:
            grad_err, worst = err, name
    rows.append((f"gradients ({n_grads} tensors; worst {worst})", grad_err, grad_scale))

    gen_ok = None
    if args.generate:
        ref_tokens = ref.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                  pad_token_id=0)
        our_tokens = ours.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        gen_ok = torch.equal(ref_tokens, our_tokens)

    print(f"reference: {args.reference}")
    print(f"config: GPT-2 {args.layers} layers, d={args.d_model}, {args.heads} heads, vocab "
          f"{args.vocab}; ARMT M={args.mem}, d_mem={args.d_mem}, segment {args.segment}, "
          f"{total} tokens ({-(-total // args.segment)} segments), batch {args.batch}, "
          f"wrap_pos={args.wrap_pos}, correction={not args.no_correction}, backend={args.backend}, "
          f"{args.dtype}")
    print(f"{'quantity':<60} {'max |ours - ref|':>18} {'max |ref|':>12}")
    ok = True
    for name, err, scale in rows:
        print(f"{name:<60} {err:>18.3e} {scale:>12.3e}")
        ok &= err <= args.tol
    if gen_ok is not None:
        print(f"greedy generate (5 tokens) identical: {gen_ok}")
        ok &= gen_ok
    print(f"forward+backward time: reference {t_ref:.3f} s, rmt_fast {t_ours:.3f} s")
    print(f"{'PASS' if ok else 'FAIL'} (tolerance {args.tol:g})")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True,
                   help="path of a fetched modeling_amt/language_modeling.py (not vendored)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=211)
    p.add_argument("--positions", type=int, default=128)
    p.add_argument("--mem", type=int, default=4)
    p.add_argument("--d-mem", type=int, default=8)
    p.add_argument("--segment", type=int, default=24)
    p.add_argument("--segments", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--assoc-std", type=float, default=0.1)
    p.add_argument("--wrap-pos", action="store_true", help="the reference's wrap_pos=True")
    p.add_argument("--no-correction", action="store_true")
    p.add_argument("--generate", action="store_true", help="also compare greedy generate")
    p.add_argument("--backend", default="torch", choices=["torch", "triton", "reference"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-5)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
