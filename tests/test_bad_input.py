"""Bad input raises ValueError naming the argument and what was expected."""

import pytest
import torch

from rmt_fast import memory_attention


def _qkv(b=1, hq=4, hkv=2, length=8, d=4, dtype=torch.float32):
    return (torch.randn(b, hq, length, d, dtype=dtype), torch.randn(b, hkv, length, d, dtype=dtype),
            torch.randn(b, hkv, length, d, dtype=dtype))


@pytest.mark.parametrize("mutate,match", [
    (lambda a: dict(a, q=a["q"][0]), r"q must be a 4-D tensor"),
    (lambda a: dict(a, k=torch.randn(1, 3, 8, 4), v=torch.randn(1, 3, 8, 4)),
     r"multiple of key/value heads"),
    (lambda a: dict(a, v=a["v"][:, :, :5]), r"k and v must have the same shape"),
    (lambda a: dict(a, k=a["k"].double(), v=a["v"].double()), r"k must match q's dtype"),
    (lambda a: dict(a, num_read=5, num_write=4), r"num_read \+ num_write .* <= L"),
    (lambda a: dict(a, num_read=-1), r"num_read must be a non-negative int"),
    (lambda a: dict(a, mask="banana"), r"mask must be one of"),
    (lambda a: dict(a, backend="cuda"), r"backend must be one of"),
    (lambda a: dict(a, past_k=torch.randn(1, 2, 3, 4)), r"past_k and past_v must be given"),
    (lambda a: dict(a, past_k=torch.randn(1, 1, 3, 4), past_v=torch.randn(1, 1, 3, 4)),
     r"past_k must be \[B=1, Hkv=2, P, D=4\]"),
    (lambda a: dict(a, key_padding_mask=torch.ones(1, 7, dtype=torch.bool)),
     r"key_padding_mask must be \[B, P \+ L\] = \[1, 8\]"),
    (lambda a: dict(a, key_padding_mask=torch.ones(1, 8)), r"key_padding_mask must be bool"),
    (lambda a: dict(a, dropout_p=1.5), r"dropout_p must be in"),
    (lambda a: dict(a, scale=float("nan")), r"scale must be a finite float or None, got nan"),
    (lambda a: dict(a, scale=float("inf")), r"scale must be a finite float or None, got inf"),
    (lambda a: dict(a, scale=-float("inf")), r"scale must be a finite float or None, got -inf"),
    (lambda a: dict(a, scale="0.5"), r"scale must be a finite float or None, got '0.5'"),
    (lambda a: dict(a, num_read=True), r"num_read must be a non-negative int, got True"),
    (lambda a: dict(a, num_write=False), r"num_write must be a non-negative int, got False"),
    (lambda a: dict(a, num_read=1.0), r"num_read must be a non-negative int, got 1.0"),
    (lambda a: dict(a, past_visible_to_read=1), r"past_visible_to_read must be a bool, got 1"),
])
def test_bad_input_raises_value_error(mutate, match):
    q, k, v = _qkv()
    args = mutate(dict(q=q, k=k, v=v))
    with pytest.raises(ValueError, match=match):
        memory_attention(**args)


def test_integer_inputs_rejected():
    q, k, v = (t.long() for t in _qkv())
    with pytest.raises(ValueError, match="floating point"):
        memory_attention(q, k, v)


@pytest.mark.parametrize("field,value", [("scale", float("nan")), ("scale", float("inf")),
                                         ("num_read", True), ("num_write", True)])
def test_attention_layout_rejects_nonfinite_scale_and_bool_counts(field, value):
    """AttentionLayout (shared by every backend, also built directly by the kernels' callers)."""
    from rmt_fast.masks import AttentionLayout

    with pytest.raises(ValueError, match=field):
        AttentionLayout(**{field: value})
