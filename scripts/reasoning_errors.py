"""Where a MiniLM RMT's answers to the ``reasoning`` task (two bAbI qa4 facts, one question) go
wrong: accuracy split by whether the question's direction word also appears in the asked-for
fact and in the other fact, by the forms of the asked-for fact and of the question, and (with
several segments) by how many segments lie between each fact and the question.

``python scripts/reasoning_errors.py CHECKPOINT [--samples 256] [--segments 1]`` (a checkpoint of
``python -m rmt_fast.train_qa --task reasoning``; validation samples ``0..samples-1``).

The two facts can share the question's direction word (``The X is east of the A.`` and ``The A
is east of the Y.``, asked ``What is east of the A?``): then only the order of the arguments
tells which fact answers, so a model that matches words without reading the order is at chance
on those samples."""

import argparse
import collections

import torch

from rmt_fast.models.lora import LoRARMTEncoderForSequenceClassification
from rmt_fast.tasks.babi_qa import BabiQA, asked_and_other_fact, direction_word
from rmt_fast.train_qa import predictions


def groups(story) -> dict[str, str]:
    """The groups one story falls in (its direction-word overlaps and forms)."""
    word = direction_word(story.question)
    target, other = asked_and_other_fact(story)
    anchor_first = target.split()[1] != story.answer  # "The A is d of the X."
    return {"question's word in asked-for fact / other fact":
            f"{word in target.split()} / {word in other.split()}",
            "asked-for fact form": "The A is d of the X." if anchor_first else "The X is d of the A.",
            "question form": "What is d of the A?" if story.question.startswith(f"What is {word}")
            else "What is the A d of?"}


def positions(plan, segment_size: int) -> dict[str, str]:
    """The groups of one sample by where its facts are: segments from the asked-for fact and
    from the other fact to the question's segment (0: the question's own), and whether the two
    facts share a segment."""
    last = plan.length // segment_size - 1
    target, _ = asked_and_other_fact(plan.story)
    at = {fact: start // segment_size for fact, start in zip(plan.story.facts, plan.fact_starts, strict=True)}
    (other_seg,) = [seg for fact, seg in at.items() if fact != target]
    return {"segments from asked-for fact / other fact to the question":
            f"{last - at[target]} / {last - other_seg}",
            "facts in one segment": str(at[target] == other_seg)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--segments", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--segment-size", type=int, default=None,
                   help="read segments of this size instead of the checkpoint's")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = LoRARMTEncoderForSequenceClassification.from_pretrained(a.checkpoint)
    if a.segment_size is not None:
        model.replace_config(segment_size=a.segment_size)
    data = BabiQA("reasoning", model.tokenizer, model.rmt_config.segment_size)
    plans = data.plans("valid", a.segments, range(a.samples))
    pred, labels = predictions(model, data, "valid", a.segments, a.samples)
    correct = (pred == labels).tolist()
    counts: dict = collections.defaultdict(lambda: [0, 0])
    size = model.rmt_config.segment_size
    for plan, ok in zip(plans, correct, strict=True):
        found = groups(plan.story)
        if a.segments > 1:
            found.update(positions(plan, size))
        for kind, group in found.items():
            counts[kind, group][0] += int(ok)
            counts[kind, group][1] += 1
    right = sum(correct)
    print(f"{a.checkpoint}: validation samples 0..{a.samples - 1} at {a.segments} segment(s) of "
          f"{model.rmt_config.segment_size} tokens, "
          f"accuracy {right / a.samples:.3f}")
    print("| split | group | right | samples | accuracy |\n|---|---|---|---|---|")
    for (kind, group), (c, t) in sorted(counts.items()):
        print(f"| {kind} | {group} | {c} | {t} | {c / t:.3f} |")


if __name__ == "__main__":
    main()
