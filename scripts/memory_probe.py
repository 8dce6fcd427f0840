"""Does a ``reasoning`` MiniLM RMT's memory hold both facts? Two readings of the memory that
enters the question's segment, on validation stories whose two facts both lie before it:

* **both questions**: the question's segment is read twice from that memory, once with the
  story's question and once with the question about the other fact (the same form, the other
  fact's direction). A memory holding both facts answers both; one holding one fact answers one
  of them, or names the same place twice.
* **linear probes**: a multinomial logistic regression from the memory ``[M * d]`` to each fact's
  own place (the older fact's, the newer fact's), its direction from the anchor and its
  direction word as written, to the shared anchor, and to the place the model's answer named and
  the one it did not, fitted on the first ``--fit`` share of the stories (its L2 weight picked on
  the last fifth of those), scored on the rest; the same with one hidden layer (64 ReLU units),
  for a code a linear probe cannot read. What a probe reads well above its majority baseline is
  in the memory.

``python scripts/memory_probe.py CHECKPOINT [--segments 8] [--samples 2048]`` (a checkpoint of
``python -m rmt_fast.train_qa --task reasoning``; validation samples ``0..samples-1``)."""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from rmt_fast import dtypes
from rmt_fast.models.lora import LoRARMTEncoderForSequenceClassification
from rmt_fast.tasks.babi_qa import (
    DIRECTIONS,
    LOCATIONS,
    BabiQA,
    Story,
    anchor_of,
    fact_targets,
    other_question,
)

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
MLP_DECAY = (1e-2, 1e-1, 1.0)


def swap_question(data: BabiQA, ids: torch.Tensor, story: Story, twin: Story) -> torch.Tensor:
    """The last segment's ``ids`` ``[S]`` with the story's question replaced by the twin's (the
    question ends the segment; both must be the same number of tokens)."""
    q, q2 = (torch.from_numpy(data.encode(s.question).astype("int64")) for s in (story, twin))
    if len(q) != len(q2) or not torch.equal(ids[-len(q):], q):
        raise ValueError(f"cannot swap {story.question!r} for {twin.question!r} in the segment")
    out = ids.clone()
    out[-len(q2):] = q2
    return out


@torch.no_grad()
def read(model, data: BabiQA, plans, dtype: torch.dtype, batch_size: int = 32):
    """For each plan: the memory entering the last segment ``[N, M, d]`` and the logits
    ``[N, 2, C]`` for the story's question and for the other question (float32)."""
    model.eval()
    memories, logits = [], []
    for start in range(0, len(plans), batch_size):
        chunk = plans[start: start + batch_size]
        segments = list(data.stream(chunk))
        state = model.init_state(len(chunk))
        with dtypes.autocast(dtype, model.device):
            for ids, mask in segments[:-1]:
                _, state = model.segment_forward(state, ids, mask)
            ids, mask = segments[-1]
            twins = torch.stack([swap_question(data, row, p.story, other_question(p.story))
                                 for row, p in zip(ids, chunk, strict=True)])
            both = [model.segment_forward(state, x, mask)[0].logits for x in (ids, twins)]
        memories.append(state.memory.float())
        logits.append(torch.stack(both, dim=1).float())
    return torch.cat(memories), torch.cat(logits)


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float, classes: int = len(LOCATIONS),
              steps: int = 100) -> torch.Tensor:
    """Multinomial logistic regression ``[F + 1, C]`` (bias last) on ``x`` ``[N, F]``, ``y``
    ``[N]`` by L-BFGS, mean cross-entropy plus ``l2 * |W|^2``."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    w = torch.zeros(xb.shape[1], classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xb @ w, y) + l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def probe_accuracy(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    return ((xb @ w).argmax(-1) == y).float().mean().item()


def fit_mlp(x: torch.Tensor, y: torch.Tensor, weight_decay: float, classes: int = len(LOCATIONS),
            hidden: int = 64, steps: int = 300, seed: int = 0) -> torch.nn.Module:
    """A one-hidden-layer ReLU probe on ``x`` ``[N, F]`` (float32), full-batch AdamW."""
    with torch.random.fork_rng():  # torch's default init, seeded, the global RNG left as it was
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(),
                                  torch.nn.Linear(hidden, classes))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    return net.eval()


def mlp_accuracy(net, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(-1) == y).float().mean().item()


def tuned(fit_fn, score, grid, x: torch.Tensor, y: torch.Tensor, fit: int):
    """``fit_fn(x, y, h)`` for each ``h`` in ``grid`` fitted on rows ``:cut`` (the first four
    fifths of ``:fit``) and scored by ``score(model, x, y)`` on rows ``cut:fit``; the best ``h``
    refitted on rows ``:fit``. Returns ``(h, its held-out score, the refitted model)``."""
    cut = fit - fit // 5
    held = {h: score(fit_fn(x[:cut], y[:cut], h), x[cut:fit], y[cut:fit]) for h in grid}
    best = max(held, key=held.get)
    return best, held[best], fit_fn(x[:fit], y[:fit], best)


def probe(x: torch.Tensor, y: torch.Tensor, fit: int, mlp: bool = True) -> dict:
    """Fit on rows ``:fit`` (L2 weight picked on the last fifth of them, then refitted on all),
    score on rows ``fit:``. ``x`` is standardized by the fitting rows' mean and deviation.
    ``mlp``: also a one-hidden-layer probe (its weight decay picked the same way), for what a
    linear probe cannot read."""
    mean, std = x[:fit].mean(0), x[:fit].std(0).clamp(min=1e-6)
    x = (x - mean) / std
    xd = x.double()
    l2, held, w = tuned(fit_probe, probe_accuracy, L2_GRID, xd, y, fit)
    majority = torch.bincount(y[:fit], minlength=len(LOCATIONS)).argmax()
    out = {"l2": l2, "held_out": held, "fit_accuracy": probe_accuracy(w, xd[:fit], y[:fit]),
           "test_accuracy": probe_accuracy(w, xd[fit:], y[fit:]),
           "majority_baseline": (y[fit:] == majority).float().mean().item(), "test_rows": len(y) - fit}
    if mlp:
        x = x.float()
        wd, _, net = tuned(fit_mlp, mlp_accuracy, MLP_DECAY, x, y, fit)
        out.update(mlp_weight_decay=wd, mlp_test_accuracy=mlp_accuracy(net, x[fit:], y[fit:]))
    return out


def both_questions(story_pred: torch.Tensor, twin_pred: torch.Tensor, story_label: torch.Tensor,
                   twin_label: torch.Tensor) -> dict:
    """How the answers to a story's question and to its twin's relate (``[N]`` each)."""
    a, b = story_pred == story_label, twin_pred == twin_label
    n = len(a)
    return {"stories": n, "both right": (a & b).sum().item() / n, "only one right": (a ^ b).sum().item() / n,
            "neither right": (~a & ~b).sum().item() / n,
            "same place for both questions": (story_pred == twin_pred).sum().item() / n,
            "answers swapped": ((story_pred == twin_label) & (twin_pred == story_label)).sum().item() / n}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--segments", type=int, default=8)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--fit", type=float, default=2 / 3, help="share of the carried stories the probes fit on")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the numbers here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = LoRARMTEncoderForSequenceClassification.from_pretrained(a.checkpoint)
    dtype = dtypes.resolve_dtype(a.dtype, model.device)
    size = model.rmt_config.segment_size
    data = BabiQA("reasoning", model.tokenizer, size)
    plans = data.plans("valid", a.segments, range(a.samples))
    last = a.segments - 1
    # both facts before the question's segment
    carried = [pl for pl in plans if max(pl.fact_starts) // size < last]
    if len(carried) < 10:
        raise SystemExit(f"only {len(carried)} of {a.samples} stories carry both facts: "
                         "more --samples or --segments")
    t0 = time.time()
    memory, logits = read(model, data, carried, dtype)
    pred = logits.argmax(-1)
    stories = [pl.story for pl in carried]
    twins = [other_question(s) for s in stories]
    label, twin_label = (torch.tensor([s.label for s in ss]) for ss in (stories, twins))
    facts = torch.tensor([fact_targets(s) for s in stories])  # [N, 2 facts, (place, direction)]
    newer_asked = label == facts[:, 1, 0]
    # accuracy per asked-for fact: every story asks once for each
    older_right = torch.where(newer_asked, pred[:, 1] == twin_label, pred[:, 0] == label)
    newer_right = torch.where(newer_asked, pred[:, 0] == label, pred[:, 1] == twin_label)
    result = {"checkpoint": a.checkpoint, "segments": a.segments, "samples": a.samples,
              "carried_stories": len(carried), "dtype": dtypes.dtype_name(dtype),
              "story_question_accuracy": (pred[:, 0] == label).float().mean().item(),
              "asked_for_older_fact": older_right.float().mean().item(),
              "asked_for_newer_fact": newer_right.float().mean().item(),
              "both_questions": both_questions(pred[:, 0], pred[:, 1], label, twin_label)}
    x = memory.flatten(1)
    fit = int(len(carried) * a.fit)
    # the direction word as written (the direction from the anchor also needs the word order)
    words = torch.tensor([[DIRECTIONS.index(f.split()[3]) for f in s.facts] for s in stories])
    targets = {"older fact's place": facts[:, 0, 0], "newer fact's place": facts[:, 1, 0],
               "anchor": torch.tensor([LOCATIONS.index(anchor_of(s)) for s in stories]),
               "older fact's direction": facts[:, 0, 1], "newer fact's direction": facts[:, 1, 1],
               "older fact's direction word": words[:, 0], "newer fact's direction word": words[:, 1]}
    result["probes"] = {k: probe(x, y, fit) for k, y in targets.items()}
    # where the story's answer names one of the two places: is the place it did not name in the
    # memory too? (4 places are left once the anchor and the named place are known: 0.25)
    named = ((facts[:, :, 0] == pred[:, :1]).any(1)).nonzero().squeeze(1)
    unnamed = torch.where(facts[named, 0, 0] == pred[named, 0], facts[named, 1, 0], facts[named, 0, 0])
    result["named_one_of_the_places"] = len(named) / len(stories)
    cut = int(len(named) * a.fit)
    result["probes"]["place the answer named"] = probe(x[named], pred[named, 0], cut)
    result["probes"]["place the answer did not name"] = probe(x[named], unnamed, cut)
    result["seconds"] = round(time.time() - t0, 1)
    q = result["both_questions"]
    print(f"{a.checkpoint}: validation samples 0..{a.samples - 1} at {a.segments} segments of {size} "
          f"tokens; {len(carried)} stories carry both facts into the question's segment ({result['dtype']}, "
          f"{result['seconds']} s)\n")
    print(f"story's question {result['story_question_accuracy']:.3f}; asked for the older fact "
          f"{result['asked_for_older_fact']:.3f}, for the newer {result['asked_for_newer_fact']:.3f}\n")
    print("| both questions from one memory | share of stories |\n|---|---|")
    for k, v in q.items():
        if k != "stories":
            print(f"| {k} | {v:.3f} |")
    print(f"\n| probe on the memory ({fit} stories fitted, {len(carried) - fit} scored) | linear: test "
          f"accuracy | one hidden layer: test accuracy | majority | linear: fit accuracy | L2 |\n"
          f"|---|---|---|---|---|---|")
    for k, r in result["probes"].items():
        print(f"| {k} | {r['test_accuracy']:.3f} | {r['mlp_test_accuracy']:.3f} | "
              f"{r['majority_baseline']:.3f} | {r['fit_accuracy']:.3f} | {r['l2']:g} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
