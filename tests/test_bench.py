"""The benchmark harness runs, and the memory claims hold (no timing is asserted)."""

import torch

import flexrope
from flexrope import _bench


def test_harness_runs_every_case_and_prints_a_table():
    results, _ = _bench.run((1, 2, 8, 16), dtypes=(torch.float32,), layouts=("b h s d", "b s h d"), rounds=1,
                            number=1, peers=False)
    assert {r.who for r in results} == {"flexrope", "flexrope inplace"}
    assert len(results) == 2 * 2 * 2 and all(r.seconds > 0 and r.floor > 0 for r in results)
    assert "ratio" in _bench.table(results)


def test_out_of_place_allocates_the_output_and_little_else_in_place_nothing_of_x_size():
    cos, sin = flexrope.precompute_rope_params(128, context_length=512)
    for dtype, scratch_limit in ((torch.float32, 0.2), (torch.bfloat16, 0.45)):
        x = torch.randn(8, 16, 128, 128).to(dtype)  # 2M elements: the chunked path
        x_bytes = x.numel() * x.element_size()
        for interleaved in (False, True):
            out_of_place = _bench.peak_allocation(lambda: flexrope.compute_rope(x, cos, sin, interleaved=interleaved))
            in_place = _bench.peak_allocation(
                lambda: flexrope.compute_rope(x, cos, sin, interleaved=interleaved, inplace=True))
            assert x_bytes <= out_of_place <= (1 + scratch_limit) * x_bytes
            assert in_place <= scratch_limit * x_bytes


def test_peak_allocation_sees_temporaries():
    x = torch.randn(1000)
    assert _bench.peak_allocation(lambda: x * 2 + x * 3) >= 3 * 4000  # two products and the sum
