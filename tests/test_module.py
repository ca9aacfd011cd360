import pytest
import torch

import flexrope
from flexrope import FlexRopeError, LayoutError, RotaryEmbedding, compute_rope, testing


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("layout", ["b h s d", "b s h d", "s b h d", "b s (h d)"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_module_equals_functional(layout, interleaved):
    rope = RotaryEmbedding(16, layout=layout, context_length=64, interleaved=interleaved)
    shapes = {"b h s d": (2, 4, 7, 16), "b s h d": (2, 7, 4, 16), "s b h d": (7, 2, 4, 16), "b s (h d)": (2, 7, 64)}
    q, k = _randn(*shapes[layout], seed=1), _randn(*shapes[layout], seed=2)
    cos, sin = flexrope.precompute_rope_params(16, context_length=64)
    lengths = {"d": 16} if "(h d)" in layout else {}
    rq, rk = rope(q, k, offset=3)
    assert torch.equal(rq, compute_rope(q, cos, sin, layout, offset=3, interleaved=interleaved, **lengths))
    assert torch.equal(rk, compute_rope(k, cos, sin, layout, offset=3, interleaved=interleaved, **lengths))
    assert torch.equal(rope(q, offset=3), rq)


@pytest.mark.parametrize("kv_heads", [8, 2, 1])
def test_gqa_and_mqa_head_counts(kv_heads):
    rope = RotaryEmbedding(32, layout="b s (h d)")
    q, k = _randn(2, 5, 8 * 32), _randn(2, 5, kv_heads * 32, seed=1)
    rq, rk = rope(q, k)
    assert rq.shape == q.shape and rk.shape == k.shape
    # each key head is rotated as a query head holding the same values would be
    rq_of_k = rope(k[:, :, :32].repeat(1, 1, 8))
    assert torch.equal(rk[:, :, :32], rq_of_k[:, :, :32])


@pytest.mark.parametrize("interleaved", [False, True])
def test_step_by_step_decoding_equals_the_full_sequence(interleaved):
    rope = RotaryEmbedding(16, layout="b s h d", context_length=32, interleaved=interleaved)
    x = _randn(2, 12, 3, 16)
    full = rope(x)
    prefill = rope(x[:, :5])
    steps = [rope(x[:, t : t + 1], offset=t) for t in range(5, 12)]
    assert torch.equal(torch.cat([prefill, *steps], dim=1), full)


def test_left_padded_batch_with_per_row_offsets():
    """Row 0 has 2 pad tokens on the left: its first real token is at position 0, so its offset is -2 + ...;
    flexrope takes explicit positions per row instead of one shared offset."""
    rope = RotaryEmbedding(8, layout="b s h d", context_length=32)
    x = _randn(2, 4, 1, 8)
    # next decode step: row 0 has 5 real tokens so far, row 1 has 7
    step = x[:, :1]
    out = rope(step, offset=torch.tensor([5, 7]))
    assert torch.equal(out[0], rope(step[:1], offset=5)[0])
    assert torch.equal(out[1], rope(step[1:], offset=7)[0])
    # a prefill with positions (b, s): pad positions repeat 0 and are masked by attention anyway
    positions = torch.tensor([[0, 0, 0, 1], [0, 1, 2, 3]])
    prefill = rope(x, positions=positions)
    assert torch.equal(prefill[0, 2:], rope(x[:1, 2:])[0])
    assert torch.equal(prefill[1], rope(x[1:])[0])


def test_queries_for_new_tokens_keys_for_the_whole_cache():
    rope = RotaryEmbedding(8, layout="b h s d", context_length=32)
    q, k = _randn(1, 2, 1, 8), _randn(1, 2, 9, 8)
    rq, rk = rope(q, k, offset=8, k_offset=0)
    assert torch.equal(rq, rope(q, offset=8)) and torch.equal(rk, rope(k))
    with pytest.raises(FlexRopeError, match="q has 1 tokens and k has 9: say where k's tokens are"):
        rope(q, k, offset=8)


def test_positions_past_context_length_raise_naming_the_limit():
    rope = RotaryEmbedding(8, context_length=16)
    with pytest.raises(FlexRopeError, match=r"past the table's 16 positions") as info:
        rope(_randn(1, 1, 4, 8), offset=13)
    assert "RotaryEmbedding(layout='b h s d', head_dim=8) on q of shape (1, 1, 4, 8)" in str(info.value)
    with pytest.raises(FlexRopeError, match=r"on q of shape \(1, 1, 2, 8\): positions reach position 16"):
        rope(_randn(1, 1, 2, 8), positions=torch.tensor([3, 16]))
    # position values in tensors too, naming the tensor whose positions they are
    q, k = _randn(1, 4, 1, 8), _randn(1, 2, 1, 8)
    with pytest.raises(FlexRopeError, match=r"on q of shape \(1, 4, 1, 8\): offset \+ arange\(1\) reach position 16"):
        rope(q, k, offset=torch.tensor([16]))
    with pytest.raises(FlexRopeError, match=r"on k of shape \(1, 2, 1, 8\): positions hold position -1"):
        rope(q, k, offset=3, k_positions=torch.tensor([[-1]]))


def test_bad_layout_fails_at_construction():
    with pytest.raises(LayoutError, match=r"RotaryEmbedding\(head_dim=8, layout='b t h d'\): unknown axis 't'"):
        RotaryEmbedding(8, layout="b t h d")
    with pytest.raises(LayoutError, match=r"pass b=\.\.\. or h=\.\.\."):
        RotaryEmbedding(8, layout="s (b h) d")
    with pytest.raises(FlexRopeError, match="head dim 7 is odd"):
        RotaryEmbedding(7)


def test_head_dim_is_checked_on_every_call():
    rope = RotaryEmbedding(16, layout="b s h d")
    with pytest.raises(LayoutError, match=r"on k of shape \(1, 3, 2, 8\): dim 3 \(axis d\) has length 8 but d=16"):
        rope(_randn(1, 3, 2, 16), _randn(1, 3, 2, 8))


def test_tables_are_buffers_not_in_state_dict():
    rope = RotaryEmbedding(16, context_length=64)
    assert dict(rope.named_buffers()).keys() == {"cos", "sin"}
    assert rope.state_dict() == {}
    assert list(rope.parameters()) == []


def test_tables_stay_float32_after_a_bf16_cast_and_bf16_is_rotated_in_float32():
    rope = RotaryEmbedding(32, context_length=64)
    reference_tables = (rope.cos.clone(), rope.sin.clone())
    rope.to(torch.bfloat16)
    assert rope.cos.dtype == torch.float32
    assert torch.equal(rope.cos, reference_tables[0]) and torch.equal(rope.sin, reference_tables[1])
    x = _randn(2, 3, 40, 32).to(torch.bfloat16)
    assert torch.equal(rope(x), rope(x.float()).to(torch.bfloat16))
    rope.half()
    assert rope.cos.dtype == torch.float32


def test_float64_cast_recomputes_tables_in_float64():
    rope = RotaryEmbedding(32, context_length=64).double()
    cos64, _ = flexrope.precompute_rope_params(32, context_length=64, dtype=torch.float64)
    assert rope.cos.dtype == torch.float64 and torch.equal(rope.cos, cos64)


def test_meta_init_then_to_empty_then_reset_parameters():
    with torch.device("meta"):
        rope = RotaryEmbedding(16, layout="b s h d", context_length=64, rotary_dim=8)
    assert rope.cos.is_meta
    rope.to_empty(device="cpu")
    rope.reset_parameters()
    fresh = RotaryEmbedding(16, layout="b s h d", context_length=64, rotary_dim=8)
    assert torch.equal(rope.cos, fresh.cos) and torch.equal(rope.sin, fresh.sin)
    x = _randn(1, 5, 2, 16)
    assert torch.equal(rope(x), fresh(x))


def test_module_matches_float64_loop():
    rope = RotaryEmbedding(16, layout="b s h d", context_length=64).double()
    x = _randn(2, 9, 3, 16, dtype=torch.float64)
    y = rope(x, offset=4)
    expected = testing.rope_loop(x.transpose(1, 2), (4 + torch.arange(9)).expand(2, 9))
    torch.testing.assert_close(y.transpose(1, 2), expected, atol=testing.tolerance(torch.float64), rtol=0)


def test_repr_names_the_configuration():
    text = repr(RotaryEmbedding(64, layout="b s h d", rotary_dim=32, interleaved=True))
    assert "layout='b s h d'" in text and "rotary_dim=32" in text and "interleaved=True" in text


def test_explicit_equal_offsets_for_q_and_k_of_different_lengths_are_fine():
    rope = RotaryEmbedding(8, context_length=32)
    q, k = _randn(1, 2, 3, 8), _randn(1, 2, 9, 8)
    rq, rk = rope(q, k, offset=0, k_offset=0)
    assert torch.equal(rq, rope(q)) and torch.equal(rk, rope(k))


def test_k_inherits_q_positions_or_takes_its_own():
    rope = RotaryEmbedding(16, layout="b s h d", context_length=64)
    cos, sin = rope.cos, rope.sin
    q, k = _randn(2, 5, 4, 16, seed=1), _randn(2, 5, 2, 16, seed=2)
    positions = torch.tensor([[3, 9, 1, 40, 7], [0, 0, 5, 6, 63]])
    k_positions = torch.tensor([2, 4, 6, 8, 10])
    q2, k2 = rope(q, k, positions=positions)
    assert torch.equal(k2, compute_rope(k, cos, sin, "b s h d", positions=positions))
    q3, k3 = rope(q, k, positions=positions, k_positions=k_positions)
    assert torch.equal(q3, q2) and torch.equal(k3, compute_rope(k, cos, sin, "b s h d", positions=k_positions))


def test_length_dependent_recipe_counts_k_past_the_original_length():
    """q within L0 but k (the whole cache) past it: the call's length is k's, as the reference counts it."""
    scaling = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32}
    rope = RotaryEmbedding(16, layout="b s h d", context_length=256, scaling=scaling)
    q, k = _randn(1, 1, 2, 16, seed=3), _randn(1, 50, 2, 16, seed=4)
    q2, k2 = rope(q, k, offset=10, k_offset=0)
    cos, sin = flexrope.precompute_rope_params(16, context_length=50, scaling=scaling)
    assert torch.equal(q2, compute_rope(q, cos, sin, "b s h d", offset=10))
    assert torch.equal(k2, compute_rope(k, cos, sin, "b s h d"))


def test_d_as_a_keyword_is_refused():
    with pytest.raises(FlexRopeError, match="d=16 was given as a keyword: head_dim gives d"):
        RotaryEmbedding(16, layout="b s (h d)", d=16)


def test_q_and_k_of_different_lengths_error_names_the_module():
    rope = RotaryEmbedding(16, layout="b s h d", context_length=64)
    with pytest.raises(FlexRopeError, match=r"^RotaryEmbedding\(layout='b s h d', head_dim=16\): q has 5 tokens and k "
                                            r"has 7"):
        rope(_randn(1, 5, 2, 16), _randn(1, 7, 2, 16))


def test_misspelled_module_keyword_is_named():
    with pytest.raises(FlexRopeError, match=r"unknown keyword interleave=: did you mean interleaved=\?"):
        RotaryEmbedding(16, layout="b s h d", interleave=True)
