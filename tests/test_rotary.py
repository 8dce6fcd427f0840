"""rmt_fast.models.rotary: moving rotary-embedded keys, against transformers' own rotary."""

import pytest
import torch
from models import tiny_llama
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from rmt_fast.models.rotary import find_rotary, interleaved, inv_freq, shift_keys


def rotated(rotary, keys, positions):
    """``keys`` ``[B, H, P, D]`` at ``positions`` ``[B, P]`` by transformers' Llama code."""
    cos, sin = rotary(keys, positions)
    return apply_rotary_pos_emb(keys, keys, cos, sin)[1]


def test_shift_equals_rotating_at_the_moved_positions():
    rotary = find_rotary(tiny_llama()).double()
    torch.manual_seed(0)
    keys = torch.randn(3, 2, 5, 8, dtype=torch.float64)
    pos = torch.randint(0, 40, (3, 5))
    delta = torch.tensor([-17, 0, 9])
    moved = shift_keys(rotated(rotary, keys, pos), delta, rotary)
    torch.testing.assert_close(moved, rotated(rotary, keys, pos + delta[:, None]), atol=1e-5, rtol=0)
    back = shift_keys(moved, -delta, rotary)
    torch.testing.assert_close(back, rotated(rotary, keys, pos), atol=1e-5, rtol=0)


def test_partial_rotary_leaves_the_other_features():
    class Rotary(nn.Module):  # a GPT-NeoX-style partial rotary: 4 of 8 features
        def __init__(self):
            super().__init__()
            self.register_buffer("inv_freq", torch.tensor([1.0, 0.1]), persistent=False)

    keys = torch.randn(2, 1, 3, 8)
    moved = shift_keys(keys, torch.tensor([5, -3]), Rotary(), pairs=False)
    assert torch.equal(moved[..., 4:], keys[..., 4:])
    assert (moved[..., :4] - keys[..., :4]).abs().max() > 1e-2
    torch.testing.assert_close(moved[..., :4].norm(dim=-1), keys[..., :4].norm(dim=-1))


def test_bad_shapes_and_missing_or_mixed_rotaries():
    rotary = find_rotary(tiny_llama())
    with pytest.raises(ValueError, match=r"delta must have shape \[2\]"):
        shift_keys(torch.randn(2, 1, 3, 8), torch.tensor([1]), rotary)
    with pytest.raises(ValueError, match="rotary dim 8 exceeds the key dim 4"):
        shift_keys(torch.randn(2, 1, 3, 4), torch.tensor([1, 2]), rotary)
    assert find_rotary(nn.Linear(2, 2)) is None
    other = find_rotary(tiny_llama())
    other.inv_freq = other.inv_freq * 2
    with pytest.raises(NotImplementedError, match="different frequencies"):
        find_rotary(nn.ModuleList([rotary, other]))


def test_interleaved_pairs_equal_coheres_own_rotation():
    """Cohere pairs features (2i, 2i + 1): read off its modeling file's rotate_half, and the
    shift equals Cohere's own rotation at the moved positions (Llama's pairing would not)."""
    from transformers import CohereConfig, CohereForCausalLM
    from transformers.models.cohere import modeling_cohere

    model = CohereForCausalLM(CohereConfig(vocab_size=61, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4))
    rotary = find_rotary(model).double()
    assert interleaved(rotary) and not interleaved(find_rotary(tiny_llama()))
    torch.manual_seed(0)
    keys = torch.randn(3, 2, 5, 8, dtype=torch.float64)
    pos, delta = torch.randint(0, 40, (3, 5)), torch.tensor([-17, 0, 9])

    def own(positions):
        cos, sin = rotary(keys, positions)
        return modeling_cohere.apply_rotary_pos_emb(keys, keys, cos, sin)[1]

    torch.testing.assert_close(shift_keys(own(pos), delta, rotary), own(pos + delta[:, None]),
                               atol=1e-5, rtol=0)
    wrong = shift_keys(own(pos), delta, rotary, pairs=False)
    assert (wrong - own(pos + delta[:, None])).abs().max() > 1e-2


def test_layer_type_frequencies_and_unreadable_rotaries():
    """Gemma 3's one rotary module keeps a ``<layer type>_inv_freq`` per layer type: equal ones
    are used, different ones refused; a rotary module whose modeling file has no rotate_half
    to read the pairing from is refused."""
    class Typed(nn.Module):
        def __init__(self, full):
            super().__init__()
            self.register_buffer("sliding_attention_inv_freq", torch.tensor([1.0, 0.1]))
            self.register_buffer("sliding_attention_original_inv_freq", torch.tensor([3.0, 3.0]))
            self.register_buffer("full_attention_inv_freq", torch.tensor(full))

    assert torch.equal(inv_freq(Typed([1.0, 0.1])), torch.tensor([1.0, 0.1]))
    with pytest.raises(NotImplementedError, match="different rotary frequencies per layer type"):
        inv_freq(Typed([1.0, 0.01]))
    with pytest.raises(NotImplementedError, match="cannot tell how Typed's model pairs"):
        interleaved(Typed([1.0, 0.1]))
