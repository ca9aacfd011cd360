"""The compiled path for large out-of-place calls gives the eager kernels' bits, and steps aside cleanly."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import flexrope
from flexrope import _fused, _rotation, compute_rope


@pytest.fixture
def fused_everywhere(monkeypatch):
    monkeypatch.setattr(_fused, "FUSED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(_rotation, "SMALL_ELEMENTS", 0)
    monkeypatch.setattr(_fused, "_unavailable", False)


def _eager(monkeypatch, fn):
    monkeypatch.setattr(_fused, "ENABLED", False)
    try:
        return fn()
    finally:
        monkeypatch.setattr(_fused, "ENABLED", True)


CASES = [
    ("b h s d", False, torch.float32, None),
    ("b s h d", False, torch.bfloat16, None),
    ("b h s d", True, torch.float32, None),
    ("b s h d", True, torch.bfloat16, None),
    ("s b h d", False, torch.float64, 6),
]


@pytest.mark.parametrize("layout, interleaved, dtype, rotary_dim", CASES)
def test_compiled_equals_eager_bitwise_and_compiles_once_for_all_lengths(
    fused_everywhere, monkeypatch, layout, interleaved, dtype, rotary_dim
):
    torch._dynamo.reset()
    counters.clear()
    cos, sin = flexrope.precompute_rope_params(8, context_length=64, rotary_dim=rotary_dim)
    dims = {"b": 2, "h": 3, "d": 8}
    for seq_len in (5, 9, 17):
        dims["s"] = seq_len
        x = torch.randn(*(dims[a] for a in layout.split()), dtype=dtype)
        kwargs = dict(interleaved=interleaved, rotary_dim=rotary_dim, offset=3)
        fused = compute_rope(x, cos, sin, layout, **kwargs)
        eager = _eager(monkeypatch, lambda: compute_rope(x, cos, sin, layout, **kwargs))
        assert torch.equal(fused, eager) and fused.stride() == x.stride()
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_path_was_taken(fused_everywhere, monkeypatch):
    calls = []
    def recording(key, rotary_dim, interleaved):
        return lambda *args: calls.append(key) or _rotation.fused_expression(*args, rotary_dim, interleaved)

    monkeypatch.setattr(_fused, "_kernel", recording)
    cos, sin = flexrope.precompute_rope_params(8, context_length=16)
    compute_rope(torch.randn(1, 2, 5, 8), cos, sin)
    assert len(calls) == 1


def test_compiler_failure_falls_back_to_eager_with_one_warning(fused_everywhere, monkeypatch):
    def broken(key, rotary_dim, interleaved):
        def fail(*args):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(_fused, "_kernel", broken)
    cos, sin = flexrope.precompute_rope_params(8, context_length=16)
    x = torch.randn(1, 2, 5, 8)
    with pytest.warns(RuntimeWarning, match="torch.compile failed here .*no C\\+\\+ compiler"):
        y = compute_rope(x, cos, sin)
    assert torch.equal(y, _eager(monkeypatch, lambda: compute_rope(x, cos, sin)))
    compute_rope(x, cos, sin)  # no second warning: the path stays off


@pytest.mark.parametrize("x", [
    torch.randn(1, 2, 5, 16)[..., ::2],  # channels not contiguous
    torch.randn(1, 2, 8, 5).transpose(-1, -2),  # channels not innermost
])
def test_steps_aside_where_it_does_not_apply(fused_everywhere, monkeypatch, x):
    monkeypatch.setattr(_fused, "_kernel", lambda *key: pytest.fail("the compiled path ran"))
    cos, sin = flexrope.precompute_rope_params(8, context_length=16)
    compute_rope(x, cos, sin)
    compute_rope(torch.randn(1, 2, 5, 8), cos, sin, inplace=True)


def test_gradient_through_the_compiled_path_equals_eager(fused_everywhere, monkeypatch):
    cos, sin = flexrope.precompute_rope_params(8, context_length=32, dtype=torch.float64)
    x = torch.randn(2, 7, 3, 8, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 7, 3, 8, dtype=torch.float64)
    (fused,) = torch.autograd.grad(compute_rope(x, cos, sin, "b s h d", offset=4), x, grad)
    (eager,) = _eager(monkeypatch, lambda: torch.autograd.grad(compute_rope(x, cos, sin, "b s h d", offset=4), x,
                                                               grad))
    assert torch.equal(fused, eager)
