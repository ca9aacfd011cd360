"""The Triton kernel's fused paths (in its interpreter on CPU tensors without a GPU; tiny shapes): the QK-norm
before the rotation and the write at out's sequence indices, against the eager path."""

import pytest
import torch

import flexrope
from flexrope import FlexRopeError, compute_rope

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tables(d=8, rotary_dim=None):
    cos, sin = flexrope.precompute_rope_params(d, context_length=16, rotary_dim=rotary_dim)
    return cos.to(DEVICE), sin.to(DEVICE)


def _twice(monkeypatch, fn):
    monkeypatch.setenv("FLEXROPE_BACKEND", "triton")
    fast = fn()
    monkeypatch.setenv("FLEXROPE_BACKEND", "eager")
    return fast, fn()


@pytest.mark.parametrize("layout, shape", [("b s h d", (2, 3, 2, 8)), ("b h s d", (2, 2, 3, 8))])
@pytest.mark.parametrize("interleaved, rotary_dim, offset", [(False, None, 0.0), (True, 6, 1.0), (False, 4, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_fused_equals_eager(monkeypatch, layout, shape, interleaved, rotary_dim, offset, dtype):
    cos, sin = _tables(rotary_dim=rotary_dim)
    x = (torch.randn(shape) * 3).to(dtype).to(DEVICE)
    weight = torch.randn(8).to(DEVICE)
    positions = torch.tensor([[4, 0, 9], [1, 2, 3]], device=DEVICE)
    out = torch.full(shape, 7.0, dtype=dtype, device=DEVICE)

    def call():
        target = out.clone()
        compute_rope(x, cos, sin, layout, positions=positions, interleaved=interleaved, rotary_dim=rotary_dim,
                     norm_weight=weight, norm_eps=1e-5, norm_weight_offset=offset, out=target)
        return target

    fast, slow = _twice(monkeypatch, call)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(fast, slow, **tolerance)
    assert not torch.equal(fast, torch.full_like(fast, 7.0))


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("interleaved, rotary_dim", [(False, None), (True, 6)])
def test_out_index_equals_eager(monkeypatch, norm, interleaved, rotary_dim):
    cos, sin = _tables(rotary_dim=rotary_dim)
    x = torch.randn(2, 4, 2, 8, device=DEVICE)
    index = torch.tensor([[6, 0, -1, 2], [1, -3, 5, 3]], device=DEVICE)
    cache = torch.randn(2, 7, 2, 8, device=DEVICE)
    kwargs = dict(offset=2, interleaved=interleaved, rotary_dim=rotary_dim, out_index=index)
    if norm:
        kwargs.update(norm_weight=torch.randn(8, device=DEVICE))

    def call():
        target = cache.clone()
        assert compute_rope(x, cos, sin, "b s h d", out=target, **kwargs) is target
        return target

    fast, slow = _twice(monkeypatch, call)
    if norm:
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(fast, slow)
    for row, kept in ((0, [1, 3, 4, 5]), (1, [0, 4, 6])):  # the indices nobody writes (negative ones skipped)
        assert torch.equal(fast[row, kept], cache[row, kept])


def test_out_index_in_a_b_h_s_d_cache_with_the_fused_kernel_alone(monkeypatch):
    """Through the kernel (index past the end checked there, not on the host)."""
    from flexrope import _dispatch, _triton
    from flexrope._layout import parse_layout
    monkeypatch.setenv("FLEXROPE_BACKEND", "triton")
    cos, sin = _tables()
    x, cache = torch.randn(1, 2, 3, 8, device=DEVICE), torch.zeros(1, 2, 5, 8, device=DEVICE)
    layout = parse_layout("b h s d")
    index = torch.tensor([[4, 1, -1]], device=DEVICE)
    assert _dispatch.triton_fused(layout, x, cache, cos, sin, 3, 8, False, index=index)
    expected = torch.zeros_like(cache)
    rotated = compute_rope(x, cos, sin, "b h s d", offset=3)
    expected[:, :, 4], expected[:, :, 1] = rotated[:, :, 0], rotated[:, :, 1]
    assert torch.equal(cache, expected)
    if DEVICE == "cpu":
        with pytest.raises(FlexRopeError, match="out_index holds an index >= out's sequence length 5"):
            _dispatch.triton_fused(layout, x, cache, cos, sin, 3, 8, False, index=torch.tensor([[0, 5, 1]]))
        assert bool(_triton.index_flag(x.device))  # reset for the calls after
