import pytest
import torch

from flexrope import (FlexRopeError, RotaryEmbedding, half_split_to_interleaved, interleaved_to_half_split)


def _scores(x, wq, bq, wk, bk, q_heads, kv_heads, rope):
    b, s, _ = x.shape
    q = (x @ wq.T + bq).view(b, s, q_heads, -1)
    k = (x @ wk.T + bk).view(b, s, kv_heads, -1)
    q, k = rope(q, k)
    k = k.repeat_interleave(q_heads // kv_heads, dim=2)
    return torch.einsum("bqhd,bkhd->bhqk", q, k)


@pytest.mark.parametrize("rotary_dim", [None, 8])
@pytest.mark.parametrize("q_heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_permuted_checkpoint_gives_identical_attention_scores(rotary_dim, q_heads, kv_heads):
    gen = torch.Generator().manual_seed(0)
    d, model = 16, 32
    wq = torch.randn(q_heads * d, model, generator=gen, dtype=torch.float64)
    wk = torch.randn(kv_heads * d, model, generator=gen, dtype=torch.float64)
    bq = torch.randn(q_heads * d, generator=gen, dtype=torch.float64)
    bk = torch.randn(kv_heads * d, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 7, model, generator=gen, dtype=torch.float64)
    interleaved = RotaryEmbedding(d, layout="b s h d", rotary_dim=rotary_dim, interleaved=True).double()
    half_split = RotaryEmbedding(d, layout="b s h d", rotary_dim=rotary_dim).double()

    original = _scores(x, wq, bq, wk, bk, q_heads, kv_heads, interleaved)
    converted = _scores(
        x,
        interleaved_to_half_split(wq, q_heads, rotary_dim=rotary_dim),
        interleaved_to_half_split(bq, q_heads, rotary_dim=rotary_dim),
        interleaved_to_half_split(wk, kv_heads, rotary_dim=rotary_dim),
        interleaved_to_half_split(bk, kv_heads, rotary_dim=rotary_dim),
        q_heads, kv_heads, half_split,
    )
    torch.testing.assert_close(converted, original, atol=1e-11, rtol=0)
    # without the permutation the scores differ: the test can tell
    assert not torch.allclose(_scores(x, wq, bq, wk, bk, q_heads, kv_heads, half_split), original)


def test_round_trip_and_partial_tail_in_place():
    w = torch.randn(3 * 16, 5)
    assert torch.equal(half_split_to_interleaved(interleaved_to_half_split(w, 3), 3), w)
    moved = interleaved_to_half_split(w, 3, rotary_dim=8).view(3, 16, 5)
    assert torch.equal(moved[:, 8:], w.view(3, 16, 5)[:, 8:])


def test_head_count_that_does_not_divide_is_an_error():
    with pytest.raises(FlexRopeError, match=r"48 output rows do not split into num_heads=5 heads"):
        interleaved_to_half_split(torch.randn(48, 4), 5)
    with pytest.raises(FlexRopeError, match="rotary_dim=20 is larger than the head dim 16"):
        interleaved_to_half_split(torch.randn(48, 4), 3, rotary_dim=20)
