"""Layouts whose permutation to the canonical (b, h, s, d) view is not its own inverse: the view back must
apply the inverse permutation, on the CPU backends (the C loop, the eager kernels, the few-operation path for
small calls), in place and out of place."""

import itertools

import einops
import pytest
import torch

import flexrope
from flexrope import _eager, compute_rope
from flexrope._layout import parse_layout

from flexrope.testing import rope_loop

SIZES = {"b": 2, "h": 3, "s": 5, "d": 4}  # all different: a wrong permutation changes the shape
LAYOUTS = [" ".join(p) for p in itertools.permutations("bhsd")]


def _not_self_inverse(layout):
    permutation = parse_layout(layout).permutation
    return [permutation[i] for i in permutation] != [0, 1, 2, 3]


def test_most_layouts_are_not_their_own_inverse():
    assert {"h d s b", "s b h d", "h s b d", "s h d b"} <= {t for t in LAYOUTS if _not_self_inverse(t)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_canonical_view_and_its_inverse(layout):
    """The canonical view is what einops makes of the layout, and the view back (which the Triton kernel
    inside a compiled graph writes through) gives x again, shape and values."""
    parsed = parse_layout(layout)
    x = torch.randn(*(SIZES[n] for n in layout.split()))
    canonical = parsed.canonical(x)
    assert torch.equal(canonical, einops.rearrange(x, f"{layout} -> b h s d"))
    back = parsed.from_canonical(canonical)
    assert back.shape == x.shape and torch.equal(back, x)
    assert torch.equal(parsed.from_canonical(canonical * 2), x * 2)


def _backend(monkeypatch, backend):
    monkeypatch.setenv("FLEXROPE_BACKEND", "eager" if backend in ("eager", "small") else backend)
    if backend == "eager":  # the chunked kernels, however small the call
        monkeypatch.setattr(_eager, "SMALL_ELEMENTS", -1)


@pytest.mark.parametrize("backend", ["native", "eager", "small"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_permutation_round_trips_against_a_float64_reference(monkeypatch, backend, layout):
    _check(monkeypatch, backend, layout, torch.float32)


def _check(monkeypatch, backend, layout, dtype):
    _backend(monkeypatch, backend)
    names = layout.split()
    canonical = torch.randn(*SIZES.values(), dtype=torch.float64)
    x = canonical.permute([list("bhsd").index(n) for n in names]).contiguous().to(dtype)  # laid out as declared
    assert x.shape == tuple(SIZES[n] for n in names)
    cos, sin = flexrope.precompute_rope_params(4, context_length=16, dtype=torch.float64)
    positions = torch.tensor([[3, 0, 7, 1, 9], [2, 2, 15, 4, 0]])
    want_canonical = rope_loop(canonical, positions)
    want = want_canonical.permute([list("bhsd").index(n) for n in names])
    before = x.clone()
    for interleaved in (False, True):
        if interleaved:
            want = rope_loop(canonical, positions, interleaved=True).permute([list("bhsd").index(n) for n in names])
        out = compute_rope(x, cos, sin, layout, positions=positions, interleaved=interleaved)
        assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(x, before)
        torch.testing.assert_close(out, want.to(dtype), rtol=0, atol=1e-6)
        y = x.clone()
        assert compute_rope(y, cos, sin, layout, positions=positions, interleaved=interleaved, inplace=True) is y
        torch.testing.assert_close(y, want.to(dtype), rtol=0, atol=1e-6)
        back = compute_rope(out, cos, sin, layout, positions=positions, interleaved=interleaved, inverse=True)
        torch.testing.assert_close(back, x, rtol=0, atol=1e-6)
