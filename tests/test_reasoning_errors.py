"""scripts/reasoning_errors.py: every generated reasoning story lands in the right groups."""

from __future__ import annotations

import random

import pytest
from helpers import load_script

from rmt_fast.tasks.babi_qa import (
    OPPOSITE,
    Story,
    asked_and_other_fact,
    direction_word,
    make_story,
    order_decides,
)

errors = load_script("reasoning_errors")
OVERLAP = "question's word in asked-for fact / other fact"


def test_the_reports_example():
    story = Story(("The hallway is east of the bathroom.", "The bedroom is west of the bathroom."),
                  "What is the bathroom east of?", "bedroom")
    assert errors.groups(story) == {OVERLAP: "False / True",
                                    "asked-for fact form": "The X is d of the A.",
                                    "question form": "What is the A d of?"}
    assert asked_and_other_fact(story) == story.facts[::-1]
    with pytest.raises(ValueError, match="not a two-fact story"):
        asked_and_other_fact(Story(("Mary went to the kitchen.",), "Where is Mary?", "kitchen"))


def test_groups_follow_the_story_semantics():
    """Checked against the relation itself: the asked-for fact, read as "X lies d of A", gives
    the question's direction; forms and overlaps agree with how the story was written."""
    rng = random.Random(0)
    seen = set()
    for _ in range(400):
        story = make_story("reasoning", rng)
        g = errors.groups(story)
        seen.add(tuple(g.values()))
        target = next(f for f in story.facts if story.answer in f.split()[1:2] + f.rstrip(".").split()[-1:])
        other = next(f for f in story.facts if f != target)
        words = target.rstrip(".").split()
        d = direction_word(target)
        lies = d if words[1] == story.answer else OPPOSITE[d]  # where the answer lies from A
        q = direction_word(story.question)
        asked = q if g["question form"] == "What is d of the A?" else OPPOSITE[q]
        assert lies == asked, story
        assert g["asked-for fact form"] == ("The X is d of the A." if words[1] == story.answer
                                            else "The A is d of the X.")
        assert g[OVERLAP] == f"{q in words} / {q in other.rstrip('.').split()}"
        assert order_decides(story) == g[OVERLAP].endswith("/ True")
    # the two forms decide whether the asked-for fact has the question's word: 2 x 2 x 2 groups
    assert len(seen) == 8


def test_positions_count_segments_to_the_question():
    from rmt_fast.tasks.babi_qa import Plan

    story = Story(("The hallway is east of the bathroom.", "The bedroom is west of the bathroom."),
                  "What is the bathroom east of?", "bedroom")  # asks the second fact
    plan = Plan(story, "valid", 0, None, fact_starts=(5, 300), length=4 * 128)
    assert errors.positions(plan, 128) == {
        "segments from asked-for fact / other fact to the question": "1 / 3",
        "facts in one segment": "False"}
    plan = Plan(story, "valid", 0, None, fact_starts=(130, 200), length=4 * 128)
    assert errors.positions(plan, 128) == {
        "segments from asked-for fact / other fact to the question": "2 / 2",
        "facts in one segment": "True"}
