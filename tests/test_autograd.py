import pytest
import torch

import flexrope
from flexrope import FlexRopeError, RotaryEmbedding, compute_rope


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, requires_grad=True)


def _naive(x, cos, sin, rotary_dim, interleaved, offset):
    """Autograd through plain torch ops, (b h s d), for comparing gradients."""
    r, half = rotary_dim, rotary_dim // 2
    c, s = cos[offset : offset + x.shape[-2], :half], sin[offset : offset + x.shape[-2], :half]
    if interleaved:
        a, b = x[..., :r:2], x[..., 1:r:2]
        rot = torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)
    else:
        a, b = x[..., :half], x[..., half:r]
        rot = torch.cat([a * c - b * s, b * c + a * s], dim=-1)
    return torch.cat([rot, x[..., r:]], dim=-1)


CASES = [(False, None), (True, None), (False, 4), (True, 4)]


@pytest.mark.parametrize("interleaved, rotary_dim", CASES)
@pytest.mark.parametrize("layout", ["b h s d", "s b h d"])
def test_gradcheck_and_gradgradcheck(interleaved, rotary_dim, layout):
    cos, sin = flexrope.precompute_rope_params(8, context_length=16, rotary_dim=rotary_dim, dtype=torch.float64)
    x = _x(2, 3, 5, 8)

    def fn(x):
        return compute_rope(x, cos, sin, layout, offset=2, interleaved=interleaved, rotary_dim=rotary_dim)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("interleaved, rotary_dim", CASES)
def test_gradient_equals_autograd_through_plain_ops(interleaved, rotary_dim):
    cos, sin = flexrope.precompute_rope_params(8, context_length=16, rotary_dim=rotary_dim, dtype=torch.float64)
    x = _x(2, 3, 5, 8)
    grad_out = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    (ours,) = torch.autograd.grad(compute_rope(x, cos, sin, offset=1, interleaved=interleaved,
                                               rotary_dim=rotary_dim), x, grad_out)
    (theirs,) = torch.autograd.grad(_naive(x, cos, sin, rotary_dim or 8, interleaved, 1), x, grad_out)
    torch.testing.assert_close(ours, theirs, atol=1e-14, rtol=0)


def test_gradient_with_per_row_positions():
    cos, sin = flexrope.precompute_rope_params(8, context_length=16, dtype=torch.float64)
    x = _x(2, 5, 3, 8)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 3, 9, 0, 1]])
    assert torch.autograd.gradcheck(lambda x: compute_rope(x, cos, sin, "b s h d", positions=positions), (x,))


def test_backward_saves_nothing_of_x_size():
    rope = RotaryEmbedding(64, layout="b s h d", context_length=2048)
    x = torch.randn(1, 1024, 1, 64, requires_grad=True)  # one head: per-row angle tables would be x-sized
    positions = torch.arange(1024).expand(1, 1024)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = rope(x, positions=positions)
        y2 = rope(x, offset=5)
    (y.sum() + y2.sum()).backward()
    assert saved, "the graph saved nothing at all: the hook did not see the rotation"
    new_storage = [t for t in saved if t.untyped_storage().data_ptr() not in
                   (rope.cos.untyped_storage().data_ptr(), rope.sin.untyped_storage().data_ptr())]
    assert all(t.numel() < x.numel() // 8 for t in new_storage), [tuple(t.shape) for t in new_storage]


def test_inplace_with_autograd_on_a_non_leaf():
    cos, sin = flexrope.precompute_rope_params(8, context_length=16, dtype=torch.float64)
    leaf = _x(2, 3, 5, 8)
    y = leaf * 2.0
    out = compute_rope(y, cos, sin, inplace=True, offset=3)
    assert out is y
    out.sum().backward()
    (expected,) = torch.autograd.grad(compute_rope(leaf * 2.0, cos, sin, offset=3).sum(), leaf)
    torch.testing.assert_close(leaf.grad, expected)


def test_inplace_on_a_leaf_that_requires_grad_is_a_clear_error():
    cos, sin = flexrope.precompute_rope_params(8, context_length=16)
    x = torch.randn(1, 1, 4, 8, requires_grad=True)
    with pytest.raises(FlexRopeError, match="inplace=True on a leaf tensor that requires grad"):
        compute_rope(x, cos, sin, inplace=True)
    with torch.no_grad():
        compute_rope(x, cos, sin, inplace=True)  # allowed where autograd is off


def test_tables_that_require_grad_are_refused():
    cos, sin = flexrope.precompute_rope_params(8, context_length=16)
    with pytest.raises(FlexRopeError, match="tables require grad"):
        compute_rope(torch.randn(1, 1, 4, 8), cos.requires_grad_(), sin)


def test_bf16_gradient_is_the_float32_gradient_rounded():
    cos, sin = flexrope.precompute_rope_params(32, context_length=64)
    x32 = torch.randn(2, 4, 16, 32)
    g = torch.randn(2, 4, 16, 32)
    x16 = x32.bfloat16().requires_grad_()
    compute_rope(x16, cos, sin).backward(g.bfloat16())
    x32 = x16.detach().float().requires_grad_()
    compute_rope(x32, cos, sin).backward(g.bfloat16().float())
    assert x16.grad.dtype == torch.bfloat16
    assert torch.equal(x16.grad, x32.grad.bfloat16())
