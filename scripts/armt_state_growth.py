"""How an ARMT's associative state grows while it reads a long qa story: the largest |A| and
|z| per layer after 8 ... 31,249 segments, and the answers at the end.

``python scripts/armt_state_growth.py CHECKPOINT [--stories 4] [--segments 31250] [--writes]``
(a checkpoint of ``rmt-fast train --model armt --task qa1``; the stories are the first ones that
``python -m rmt_fast.tasks.length_eval --task qa1 --num-facts 1`` reads at that length; with one
fact each, the segment that holds each story's fact is printed first).
``--writes`` adds, per layer, what the last segment before each mark wrote and read: the RMS of
the block outputs at the memory positions (``mem``), the largest row norm of the values
``W_mv mem`` (``|v|``), the mean gate ``beta``, and the read's RMS relative to the hidden states
it is added to (``read/h``; with ``ARMTConfig.read_clip`` the clipped read, and ``raw read/h``
before the clip).
``--twins`` reads each story beside a twin whose one fact names another place (one id changed)
and prints, per layer, how far the two states are apart relative to the story's state
(``|A - A_twin| / |A|``, per story, with the segment that holds the fact): what is left of the
fact in the state after n segments of noise; and both answers at the end.
``--decays`` (a model with a learnt decay, ``ARMTConfig.decay_gate``) prints, per layer and
story, the decay the model chose at the segment that holds the fact and its mean, least and
largest value over all the other segments."""

import argparse

import torch

from rmt_fast.models.armt import AssociativeMemory, clip_read, learnt_decay, value_input
from rmt_fast.streaming import StreamingReader
from rmt_fast.tasks.babilong import PLACES
from rmt_fast.tasks.length_eval import batch_seed, load, story_batch

#: the class's own read and write, which :func:`untrace_writes` puts back
_UNTRACED = AssociativeMemory.read, AssociativeMemory.write


def trace_writes(read_clip: float = 0.0, decays: dict[int, list] | None = None
                 ) -> dict[int, dict[str, float]]:
    """Wrap :class:`AssociativeMemory`'s read and write (for every model in the process, until
    :func:`untrace_writes`) to keep, per memory module (by ``id``), the statistics of its last
    call (see the module docstring); ``read_clip``: the model's :attr:`ARMTConfig.read_clip`;
    ``decays``: where given, each write's learnt decay ``[B]`` is appended to
    ``decays[id(module)]``."""
    stats: dict[int, dict[str, float]] = {}
    read, write = AssociativeMemory.read, AssociativeMemory.write

    def rms(t):
        return float(t.float().pow(2).mean().sqrt())

    def traced_read(self, h, A, z, opts):
        out = read(self, h, A, z, opts)
        s = stats.setdefault(id(self), {})
        s["read/h"] = rms(clip_read(out, h, read_clip)) / max(rms(h), 1e-30)
        if read_clip:
            s["raw read/h"] = rms(out) / max(rms(h), 1e-30)
        return out

    def traced_write(self, mem, A, z, first, opts, value_norm=False):
        m = mem.to(self.W_mk.weight.dtype)
        s = stats.setdefault(id(self), {})
        s["mem"] = rms(m)
        s["|v|"] = float(self.W_mv(value_input(m, value_norm)).norm(dim=-1).max())
        s["beta"] = float(torch.sigmoid(self.W_mb(m)).mean())
        if self.W_ma is not None:
            alpha = learnt_decay(m, self.W_ma.weight, self.W_ma.bias, self.decay_max).detach()
            s["alpha"] = float(alpha.mean())
            if decays is not None:
                decays.setdefault(id(self), []).append(alpha)
        return write(self, mem, A, z, first, opts, value_norm)

    AssociativeMemory.read, AssociativeMemory.write = traced_read, traced_write
    return stats


def untrace_writes() -> None:
    """Undo :func:`trace_writes`: the class's own read and write again."""
    AssociativeMemory.read, AssociativeMemory.write = _UNTRACED


def twin_stories(stories: torch.Tensor, vocab, segment_size: int) -> tuple[torch.Tensor, list[int]]:
    """``[2n, L]``: the ``n`` one-fact qa1 ``stories`` ``[n, L]``, then each one's twin (the
    place of its fact, the only id before the question equal to the answer, changed to the next
    place in :data:`PLACES`, the answer too), and the segment of each story that holds its fact."""
    places = [vocab.encode([p], strict=True)[0] for p in PLACES]
    twins, where = stories.clone(), []
    for i, row in enumerate(stories):
        answer = int(row[-1])
        hits = (row[:-segment_size] == answer).nonzero().flatten().tolist()
        if len(hits) != 1 or answer not in places:
            raise ValueError(f"story {i}: expected one fact naming its answer before the "
                             f"question, found the answer id at {hits}")
        other = places[(places.index(answer) + 1) % len(places)]
        twins[i, hits[0]] = twins[i, -1] = other
        where.append(hits[0] // segment_size)
    return torch.cat([stories, twins]), where


def fact_signal(state, n: int) -> list[list[float]]:
    """Per layer, per story ``i < n``: ``|A_i - A_{n+i}| / |A_i|`` (Frobenius)."""
    return [[float((A[i] - A[n + i]).norm() / A[i].norm().clamp_min(1e-30)) for i in range(n)]
            for A in state.A]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--stories", type=int, default=4)
    p.add_argument("--segments", type=int, default=31250)
    p.add_argument("--num-facts", type=int, default=1)
    p.add_argument("--seed", type=int, default=12345, help="length_eval's --seed")
    p.add_argument("--writes", action="store_true", help="also what each layer wrote and read")
    p.add_argument("--twins", action="store_true",
                   help="also how much of the fact is left in the state (a twin story per story)")
    p.add_argument("--decays", action="store_true",
                   help="the learnt decay at the fact's segment and elsewhere (decay_gate models)")
    a = p.parse_args()
    torch.set_num_threads(1)
    model, vocab = load(a.checkpoint)
    if a.decays and (not model.rmt_config.decay_gate or a.num_facts != 1):
        p.error("--decays needs a model with a learnt decay (ARMTConfig.decay_gate) and "
                "--num-facts 1")
    decays: dict[int, list] | None = {} if a.decays else None
    stats = trace_writes(model.rmt_config.read_clip, decays) if a.writes or a.decays else None
    size = model.rmt_config.segment_size
    stories = story_batch("qa1", a.segments, size, a.stories, vocab, seed=batch_seed(a.seed, 0),
                          num_facts=a.num_facts)
    n = a.stories
    if a.twins or a.num_facts == 1:  # where a mark's numbers change: before or after the fact
        both, where = twin_stories(stories, vocab, size)
        print(f"the fact's segment per story: {where}", flush=True)
        if a.twins:
            stories = both
    reader = StreamingReader(model, batch_size=stories.shape[0], progress=False)
    context, done = stories[:, :-size], 0
    marks = [m for m in (8, 64, 256, 1024, 4096, 8192, 16384) if m < a.segments - 1] + [a.segments - 1]
    for m in marks:
        reader.feed(context[:, done * size: m * size])
        done = m
        s = reader.state
        print(f"after {m:>6} segments: max |A| per layer {[round(float(x.abs().max()), 2) for x in s.A]}, "
              f"max z {[round(float(z.max()), 2) for z in s.z]}, finite "
              f"{all(bool(torch.isfinite(x).all()) for x in s.A + s.z)}", flush=True)
        if a.twins:
            for i, row in enumerate(fact_signal(s, n)):
                print(f"    layer {i}: |A - A_twin| / |A| per story " +
                      " ".join(f"{x:.3g}" for x in row), flush=True)
        if a.writes:
            for i, mem in enumerate(model.assoc):
                print(f"    layer {i}: " + ", ".join(f"{k} {v:.3g}" for k, v in
                                                     stats.get(id(mem), {}).items()), flush=True)
    if decays is not None:
        for i, mem in enumerate(model.assoc):
            per = torch.stack(decays[id(mem)])[:, :n]  # [writes, stories]: write t = segment t
            for j in range(n):
                rest = torch.cat([per[:where[j], j], per[where[j] + 1:, j]])
                print(f"    layer {i}, story {j}: decay at the fact's segment {where[j]}: "
                      f"{float(per[where[j], j]):.3f}; elsewhere mean {float(rest.mean()):.3f}, "
                      f"min {float(rest.min()):.3f}, max {float(rest.max()):.3f}", flush=True)
    out = reader.generate(stories[:, -size:-1], max_new_tokens=1, do_sample=False, pad_token_id=0)
    def words(t):
        return vocab.decode(t.tolist())

    print("answers:", words(out[:n, -1]), "| truth:", words(stories[:n, -1]))
    if a.twins:
        print("twins' answers:", words(out[n:, -1]), "| twins' truth:", words(stories[n:, -1]))


if __name__ == "__main__":
    main()
