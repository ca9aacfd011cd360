"""The memory claims hold: out of place allocates the output and little else, in place nothing of x's size."""

import weakref

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import flexrope


class _Allocations(TorchDispatchMode):
    """Peak bytes of tensor storage created by the operations run under it and still referenced."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[int, list]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                pointer = t.untyped_storage().data_ptr()
                if pointer in self.storages:
                    self.storages[pointer][1].append(weakref.ref(t))
                elif pointer not in inputs and t.untyped_storage().nbytes():
                    self.storages[pointer] = (t.untyped_storage().nbytes(), [weakref.ref(t)])
        live = sum(size for size, refs in self.storages.values() if any(ref() is not None for ref in refs))
        self.peak = max(self.peak, live)
        return out


def peak_allocation(fn) -> int:
    """Peak bytes of new tensor storage alive while ``fn`` runs (the result counts)."""
    with torch.no_grad(), _Allocations() as tracker:
        result = fn()
        del result
    return tracker.peak


def test_out_of_place_allocates_the_output_and_little_else_in_place_nothing_of_x_size(monkeypatch):
    """The chunked eager kernels (which a dispatch mode, as this tracker is, always sees)."""
    monkeypatch.setenv("FLEXROPE_BACKEND", "eager")
    cos, sin = flexrope.precompute_rope_params(128, context_length=512)
    for dtype, scratch_limit in ((torch.float32, 0.2), (torch.bfloat16, 0.45)):
        x = torch.randn(8, 16, 128, 128).to(dtype)  # 2M elements: the chunked path
        x_bytes = x.numel() * x.element_size()
        for interleaved in (False, True):
            out_of_place = peak_allocation(lambda: flexrope.compute_rope(x, cos, sin, interleaved=interleaved))
            in_place = peak_allocation(lambda: flexrope.compute_rope(x, cos, sin, interleaved=interleaved,
                                                                     inplace=True))
            assert x_bytes <= out_of_place <= (1 + scratch_limit) * x_bytes
            assert in_place <= scratch_limit * x_bytes


def test_peak_allocation_sees_temporaries():
    x = torch.randn(1000)
    assert peak_allocation(lambda: x * 2 + x * 3) >= 3 * 4000  # two products and the sum


def allocated_bytes(fn) -> int:
    """Bytes the CPU allocator handed out while ``fn`` ran, by torch's profiler (no dispatch mode: the C loop
    runs under it); an upper bound of the peak."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    return sum(event.self_cpu_memory_usage for event in prof.events() if event.self_cpu_memory_usage > 0)


@pytest.mark.parametrize("layout, shape", [("b h s d", (2, 8, 512, 128)), ("b s h d", (2, 512, 8, 128))])
def test_the_c_loop_allocates_the_output_alone_and_in_place_nothing(monkeypatch, layout, shape):
    monkeypatch.delenv("FLEXROPE_BACKEND", raising=False)
    cos, sin = flexrope.precompute_rope_params(128, context_length=512)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(shape).to(dtype)
        x_bytes = x.numel() * x.element_size()
        flexrope.compute_rope(x.clone(), cos, sin, layout, inplace=True)  # the loop built, the geometry planned
        assert allocated_bytes(lambda: flexrope.compute_rope(x, cos, sin, layout)) == x_bytes
        assert allocated_bytes(lambda: flexrope.compute_rope(x, cos, sin, layout, inplace=True)) == 0
        # positions and row starts in tensors: the loop reads them, and the tables at them, where they are; the
        # values' check takes two scalars (their least and greatest) where there are many
        for where in (dict(positions=torch.arange(512).flip(0)), dict(positions=torch.arange(1024).view(2, 512) % 500),
                      dict(offset=torch.tensor([0, 0]))):
            flexrope.compute_rope(x.clone(), cos, sin, layout, inplace=True, **where)  # the geometry planned
            assert allocated_bytes(lambda: flexrope.compute_rope(x, cos, sin, layout, inplace=True, **where)) <= 16
