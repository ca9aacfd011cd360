"""Testing your own RoPE with flexrope.testing: a file as it would sit in your test suite.

The code under test is the book's (LLMs-from-scratch) RoPE, kept as a model has it. Needs flexrope and
hypothesis (pip install flexrope[testing]) and pytest.

Run: pytest examples/test_my_rope.py   (or python examples/test_my_rope.py)
"""

import sys

import einops
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import flexrope
from flexrope.testing import check_attention, check_rope, laid_out, layouts


# -- your code: the book's RoPE, which expects (b, h, s, d) ------------------------------------------------------

def precompute_rope_params(head_dim, theta_base=10_000, context_length=4096):
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2)[: (head_dim // 2)].float() / head_dim))
    angles = torch.arange(context_length)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=1)
    return torch.cos(angles), torch.sin(angles)


def compute_rope(x, cos, sin):
    _, _, seq_len, head_dim = x.shape
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    cos = cos[:seq_len, :].unsqueeze(0).unsqueeze(0)
    sin = sin[:seq_len, :].unsqueeze(0).unsqueeze(0)
    rotated = torch.cat((-x2, x1), dim=-1)
    return ((x * cos) + (rotated * sin)).to(dtype=x.dtype)


def rope_any_layout(x, cos, sin, layout):
    """Your wrapper for tensors in other layouts: to (b h s d) and back (a unit axis for a missing b or h)."""
    bhsd = " ".join(axis if axis in layout.split() else "1" for axis in "bhsd")
    y = compute_rope(einops.rearrange(x, f"{layout} -> {bhsd}"), cos, sin)
    return einops.rearrange(y, f"{bhsd} -> {layout}")


def attention(q, k, v):
    """Your attention on (b, s, h, d) tensors, transposed to (b, h, s, d) before the rotation."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    cos, sin = precompute_rope_params(q.shape[-1])
    out = F.scaled_dot_product_attention(compute_rope(q, cos, sin), compute_rope(k, cos, sin), v, is_causal=True)
    return out.transpose(1, 2)


COS, SIN = precompute_rope_params(head_dim=64)


# -- your tests ----------------------------------------------------------------------------------------------------

def test_rope_in_the_layout_it_is_called_with():
    check_rope(lambda x: compute_rope(x, COS, SIN), "b h s d", head_dim=64)


def test_calling_it_on_bshd_is_the_head_index_bug():
    # what the book's own example did: (b, s, h, d) tensors into a function that expects (b, h, s, d)
    with pytest.raises(AssertionError, match="each token is rotated by its head index"):
        check_rope(lambda x: compute_rope(x, COS, SIN), "b s h d", head_dim=64)


def test_attention_sees_relative_positions():
    check_attention(attention, "b s h d")


@settings(max_examples=25, deadline=None)
@given(layout=layouts(ellipsis=False, groups=False), data=st.data())
def test_the_wrapper_agrees_with_flexrope_in_every_layout(layout, data):
    case = data.draw(laid_out(layout, d=64, max_lead=0))
    ours = rope_any_layout(case.x, COS, SIN, layout)
    torch.testing.assert_close(ours, flexrope.compute_rope(case.x, COS, SIN, layout))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning"]))
