"""The compiled backend for large CPU calls gives the eager kernels' bits, and steps aside cleanly."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import flexrope
from flexrope import _compiled, _pairs, compute_rope


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv("FLEXROPE_BACKEND", "compiled")
    monkeypatch.setattr(_compiled, "unavailable", False)
    monkeypatch.setattr(_compiled, "_compiled", set())


def _eager(monkeypatch, fn):
    monkeypatch.setenv("FLEXROPE_BACKEND", "eager")
    try:
        return fn()
    finally:
        monkeypatch.setenv("FLEXROPE_BACKEND", "compiled")


CASES = [
    ("b h s d", False, torch.float32, None),
    ("b s h d", False, torch.bfloat16, None),
    ("b h s d", True, torch.float32, None),
    ("b s h d", True, torch.bfloat16, None),
    ("s b h d", False, torch.float64, 6),
]


@pytest.mark.parametrize("layout, interleaved, dtype, rotary_dim", CASES)
def test_compiled_equals_eager_bitwise_and_compiles_once_for_all_lengths(
    compiled, monkeypatch, layout, interleaved, dtype, rotary_dim
):
    torch._dynamo.reset()
    counters.clear()
    cos, sin = flexrope.precompute_rope_params(8, context_length=64, rotary_dim=rotary_dim)
    dims = {"b": 2, "h": 3, "d": 8}
    for seq_len in (5, 9, 17):
        dims["s"] = seq_len
        x = torch.randn(*(dims[a] for a in layout.split()), dtype=dtype)
        kwargs = dict(interleaved=interleaved, rotary_dim=rotary_dim, offset=3)
        out = compute_rope(x, cos, sin, layout, **kwargs)
        eager = _eager(monkeypatch, lambda: compute_rope(x, cos, sin, layout, **kwargs))
        assert torch.equal(out, eager) and out.stride() == x.stride()
    assert counters["stats"]["unique_graphs"] == 1


def test_in_place_equals_eager_bitwise(compiled, monkeypatch):
    cos, sin = flexrope.precompute_rope_params(8, context_length=64)
    x = torch.randn(2, 9, 3, 8, dtype=torch.bfloat16)
    want = _eager(monkeypatch, lambda: compute_rope(x, cos, sin, "b s h d", interleaved=True, offset=2))
    y = x.clone()
    assert compute_rope(y, cos, sin, "b s h d", interleaved=True, offset=2, inplace=True) is y
    assert torch.equal(y, want)


def test_unit_dims_never_recompile_a_variant(compiled, monkeypatch):
    """Size-1 dims were each a guard under dynamic shapes, and 9 patterns of them on a rank-6 view reached the
    recompile limit, which turned the backend off: unit dims are dropped, and it stays on."""
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(_compiled, "_kernels", {})
    cos, sin = flexrope.precompute_rope_params(8, context_length=64)
    for shape in [(2, 3, 4, 5, 6, 8), (1, 3, 4, 5, 6, 8), (2, 1, 4, 5, 6, 8), (2, 3, 1, 5, 6, 8),
                  (1, 1, 4, 5, 6, 8), (2, 3, 4, 1, 6, 8), (1, 3, 1, 5, 6, 8), (2, 1, 4, 5, 1, 8), (3, 2, 1, 1, 7, 8)]:
        x = torch.randn(shape)
        out = compute_rope(x, cos, sin, "... b h s d")
        assert torch.equal(out, _eager(monkeypatch, lambda: compute_rope(x, cos, sin, "... b h s d")))
    assert not _compiled.unavailable
    assert {key[2] for key in _compiled._kernels} <= {3, 4, 5, 6}  # ranks without unit dims


def test_compiled_path_was_taken(compiled, monkeypatch):
    calls = []

    def recording(key, rotary_dim, interleaved, inplace):
        return lambda *args: calls.append(key) or _pairs.expression(*args, rotary_dim, interleaved)

    monkeypatch.setattr(_compiled, "_kernel", recording)
    cos, sin = flexrope.precompute_rope_params(8, context_length=16)
    compute_rope(torch.randn(1, 2, 5, 8), cos, sin)
    assert len(calls) == 1


def test_compiler_failure_falls_back_to_eager_with_one_warning_at_the_callers_line(compiled, monkeypatch):
    def broken(key, rotary_dim, interleaved, inplace):
        def fail(*args):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(_compiled, "_kernel", broken)
    cos, sin = flexrope.precompute_rope_params(8, context_length=16)
    x = torch.randn(1, 2, 5, 8)
    with pytest.warns(RuntimeWarning, match="torch.compile failed here .*no C\\+\\+ compiler") as record:
        y = compute_rope(x, cos, sin)
    assert record[0].filename == __file__
    assert torch.equal(y, _eager(monkeypatch, lambda: compute_rope(x, cos, sin)))
    compute_rope(x, cos, sin)  # no second warning: the path stays off


def test_out_of_memory_propagates_and_leaves_the_backend_on(compiled, monkeypatch):
    def out_of_memory(key, rotary_dim, interleaved, inplace):
        def fail(*args):
            raise torch.OutOfMemoryError("CPU out of memory")
        return fail

    monkeypatch.setattr(_compiled, "_kernel", out_of_memory)
    cos, sin = flexrope.precompute_rope_params(8, context_length=16)
    with pytest.raises(torch.OutOfMemoryError):
        compute_rope(torch.randn(1, 2, 5, 8), cos, sin)
    assert not _compiled.unavailable


def test_an_error_after_the_variant_compiled_propagates(compiled, monkeypatch):
    cos, sin = flexrope.precompute_rope_params(8, context_length=16)
    compute_rope(torch.randn(1, 2, 5, 8), cos, sin)
    key = next(iter(_compiled._compiled))
    monkeypatch.setitem(_compiled._kernels, key, lambda *args: (_ for _ in ()).throw(RuntimeError("later")))
    with pytest.raises(RuntimeError, match="later"):
        compute_rope(torch.randn(1, 2, 5, 8), cos, sin)
    assert not _compiled.unavailable


@pytest.mark.parametrize("x", [
    torch.randn(1, 2, 5, 16)[..., ::2],  # channels not contiguous
    torch.randn(1, 2, 8, 5).transpose(-1, -2),  # channels not innermost
])
def test_steps_aside_where_it_does_not_apply(compiled, monkeypatch, x):
    monkeypatch.setattr(_compiled, "_kernel", lambda *key: pytest.fail("the compiled path ran"))
    cos, sin = flexrope.precompute_rope_params(8, context_length=16)
    compute_rope(x, cos, sin)


def test_gradient_through_the_compiled_path_equals_eager(compiled, monkeypatch):
    cos, sin = flexrope.precompute_rope_params(8, context_length=32, dtype=torch.float64)
    x = torch.randn(2, 7, 3, 8, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 7, 3, 8, dtype=torch.float64)
    (out,) = torch.autograd.grad(compute_rope(x, cos, sin, "b s h d", offset=4), x, grad)
    (eager,) = _eager(monkeypatch, lambda: torch.autograd.grad(compute_rope(x, cos, sin, "b s h d", offset=4), x,
                                                               grad))
    assert torch.equal(out, eager)
