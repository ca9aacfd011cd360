"""The eager kernels: small calls take a few whole-tensor operations, large ones walk the tensor in chunks in
memory order. Every path and every chunking gives the same bits."""

import pytest
import torch

import flexrope
from flexrope import _eager, compute_rope

LAYOUTS = {"b h s d": (2, 3, 7, 8), "b s h d": (2, 7, 3, 8), "s b h d": (7, 2, 3, 8), "h d s b": (3, 8, 7, 2),
           "b s (h d)": (2, 7, 24)}


@pytest.fixture
def chunk_elements(monkeypatch):
    """Sets the chunk size, with the small-call path off so that the chunked one runs."""
    monkeypatch.setenv("FLEXROPE_BACKEND", "eager")

    def set_to(n):
        monkeypatch.setattr(_eager, "CHUNK_ELEMENTS", n)
        monkeypatch.setattr(_eager, "MIN_CHUNK_ELEMENTS", 1)
        monkeypatch.setattr(_eager, "SMALL_ELEMENTS", 0)
    return set_to


@pytest.mark.parametrize("chunk", [1, 5, 16, 50, 1000])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_unchunked_bitwise(chunk_elements, chunk, layout, interleaved, dtype):
    cos, sin = flexrope.precompute_rope_params(8, context_length=32, rotary_dim=6)
    x = torch.randn(LAYOUTS[layout], generator=torch.Generator().manual_seed(0)).to(dtype)
    lengths = {"h": 3} if "(h d)" in layout else {}
    positions = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(1))
    kwargs = dict(interleaved=interleaved, rotary_dim=6, positions=positions, **lengths)
    whole = compute_rope(x, cos, sin, layout, **kwargs)
    chunk_elements(chunk)
    assert torch.equal(compute_rope(x, cos, sin, layout, **kwargs), whole)
    inplace = x.clone()
    compute_rope(inplace, cos, sin, layout, inplace=True, **kwargs)
    assert torch.equal(inplace, whole)


@pytest.mark.parametrize("layout", ["b h s d", "b s h d"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rotary_dim", [None, 4])
@pytest.mark.parametrize("half_width", [False, True])
def test_small_call_path_equals_chunked_path_bitwise(monkeypatch, layout, interleaved, dtype, rotary_dim, half_width):
    monkeypatch.setenv("FLEXROPE_BACKEND", "eager")
    r = rotary_dim or 8
    cos, sin = flexrope.precompute_rope_params(8, context_length=32, rotary_dim=rotary_dim, dtype=dtype)
    if half_width:
        cos, sin = cos[:, : r // 2], sin[:, : r // 2]
    x = torch.randn(1, 4, 1, 8, generator=torch.Generator().manual_seed(3)).to(dtype)  # one decoding step
    if layout == "b s h d":
        x = torch.randn(1, 4, 2, 8, generator=torch.Generator().manual_seed(3)).to(dtype)  # two heads: not canonical
    kwargs = dict(offset=9, interleaved=interleaved, rotary_dim=r)
    small = compute_rope(x, cos, sin, layout, **kwargs)
    monkeypatch.setattr(_eager, "SMALL_ELEMENTS", 0)
    chunked = compute_rope(x, cos, sin, layout, **kwargs)
    assert torch.equal(small, chunked) and small.stride() == x.stride()


def test_chunks_cover_every_element_once():
    shape = torch.Size([3, 5, 4, 6])
    for chunk in (1, 6, 7, 24, 100, 10_000):
        saved = _eager.CHUNK_ELEMENTS, _eager.MIN_CHUNK_ELEMENTS
        _eager.CHUNK_ELEMENTS, _eager.MIN_CHUNK_ELEMENTS = chunk, 1
        try:
            seen = torch.zeros(shape, dtype=torch.int32)
            for index in _eager._chunks(shape):
                seen[index] += 1
        finally:
            _eager.CHUNK_ELEMENTS, _eager.MIN_CHUNK_ELEMENTS = saved
        assert torch.equal(seen, torch.ones_like(seen))


def test_non_contiguous_input_and_output_in_other_memory_orders():
    cos, sin = flexrope.precompute_rope_params(8, context_length=32)
    base = torch.randn(7, 8, 2, 3)  # memory order s d b h
    x = base.permute(2, 3, 0, 1)  # declared b h s d, channels not innermost
    y = compute_rope(x, cos, sin)
    assert torch.equal(y, compute_rope(x.contiguous(), cos, sin))
    sliced = torch.randn(2, 3, 7, 16)[..., ::2]  # strided channels
    assert torch.equal(compute_rope(sliced, cos, sin), compute_rope(sliced.contiguous(), cos, sin))
