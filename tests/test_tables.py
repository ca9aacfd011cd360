import math

import pytest
import torch

from flexrope import precompute_rope_params, testing

from . import book

LONG = 1_048_576
THETA = 500_000.0


@pytest.fixture(scope="module")
def long_tables():
    return precompute_rope_params(128, theta_base=THETA, context_length=LONG)


def test_tables_within_1e6_of_float64_truth_at_1m_positions(long_tables):
    cos, sin = long_tables
    rows = [0, 1, 4095, 8191, 65_537, 500_000, 1_000_003, LONG - 1]
    worst = 0.0
    for row in rows:
        for i in range(64):
            c, s = testing.float64_angle_truth(row, i, 128, THETA)
            worst = max(worst, abs(cos[row, i].item() - c), abs(sin[row, i].item() - s))
    assert worst < 1e-6


def test_float32_angles_are_far_off_at_1m_positions_which_is_why_tables_use_float64(long_tables):
    # The seed's (and Hugging Face's) float32 angles, for the last 65,536 rows.
    rows = torch.arange(LONG - 65_536, LONG)
    inv_freq = 1.0 / (THETA ** (torch.arange(0, 128, 2).float() / 128))
    seed_cos = torch.cos(rows[:, None] * inv_freq[None, :])
    cos, _ = long_tables
    assert (seed_cos - cos[rows, :64]).abs().max() > 0.05


def test_seed_format_angles_written_twice(long_tables):
    cos, sin = long_tables
    assert cos.shape == (LONG, 128) and cos.dtype == torch.float32
    assert torch.equal(cos[:1000, :64], cos[:1000, 64:]) and torch.equal(sin[-1000:, :64], sin[-1000:, 64:])


def test_agrees_with_seed_tables_where_float32_angles_are_exact_enough():
    cos, sin = precompute_rope_params(64, context_length=256)
    seed_cos, seed_sin = book.seed_precompute_rope_params(64, context_length=256)
    torch.testing.assert_close(cos, seed_cos, atol=1e-4, rtol=0)
    torch.testing.assert_close(sin, seed_sin, atol=1e-4, rtol=0)


def test_partial_rotary_frequencies_come_from_rotary_dim():
    cos, _ = precompute_rope_params(64, context_length=8, rotary_dim=16, dtype=torch.float64)
    assert cos.shape == (8, 16)
    expected = [testing.float64_angle_truth(3, i, 16, 10_000.0)[0] for i in range(8)]
    torch.testing.assert_close(cos[3, :8], torch.tensor(expected, dtype=torch.float64), atol=1e-15, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_rounded_once_to_dtype(dtype):
    cos, sin = precompute_rope_params(32, context_length=100, dtype=dtype)
    cos64, sin64 = precompute_rope_params(32, context_length=100, dtype=torch.float64)
    assert cos.dtype == dtype
    assert torch.equal(cos, cos64.to(dtype)) and torch.equal(sin, sin64.to(dtype))


def test_meta_device_gives_shapes_only():
    cos, sin = precompute_rope_params(32, context_length=100, device="meta")
    assert cos.is_meta and cos.shape == (100, 32)


def test_position_one_row_is_cos_of_inverse_frequencies():
    cos, sin = precompute_rope_params(8, theta_base=100, context_length=2, dtype=torch.float64)
    for i in range(4):
        assert cos[1, i].item() == pytest.approx(math.cos(100 ** (-2 * i / 8)), abs=1e-15)
        assert sin[1, i].item() == pytest.approx(math.sin(100 ** (-2 * i / 8)), abs=1e-15)
