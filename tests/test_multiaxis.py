"""Multi-axis RoPE: against transformers' Qwen2-VL, Qwen2.5-VL and Qwen3-VL text rotary modules, the laws
of the rotation per axis, the grid form of a layout, and the errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexrope
from flexrope import FlexRopeError, LayoutError, MultiAxisRotaryEmbedding, compute_rope

EPS32 = torch.finfo(torch.float32).eps


def _qwen(kind):
    transformers = pytest.importorskip("transformers")
    if kind == "qwen2_vl":
        from transformers.models.qwen2_vl import modeling_qwen2_vl as module

        config = transformers.Qwen2VLTextConfig(
            hidden_size=256, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]})
        return config, module.Qwen2VLRotaryEmbedding(config), module
    if kind == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl import configuration_qwen2_5_vl, modeling_qwen2_5_vl as module

        config = configuration_qwen2_5_vl.Qwen2_5_VLTextConfig(
            hidden_size=256, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]})
        return config, module.Qwen2_5_VLRotaryEmbedding(config), module
    from transformers.models.qwen3_vl import configuration_qwen3_vl, modeling_qwen3_vl as module

    config = configuration_qwen3_vl.Qwen3VLTextConfig(
        hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0, "mrope_section": [24, 20, 20]})
    return config, module.Qwen3VLTextRotaryEmbedding(config), module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["b h s d", "b s h d"])
@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_vl_mrope_matches_transformers(kind, layout, dtype):
    config, rotary, module = _qwen(kind)
    rope = MultiAxisRotaryEmbedding.from_hf_config(config, layout=layout)
    assert rope.axes == {"t": 16, "y": 24, "x": 24} if kind != "qwen3_vl" else {"t": 24, "y": 20, "x": 20}
    gen = torch.Generator().manual_seed(0)
    seq = 40
    q = torch.randn(2, 2, seq, 128, generator=gen).to(dtype)
    k = torch.randn(2, 1, seq, 128, generator=gen).to(dtype)
    # text tokens (t = y = x), then a 2 x 3 x 4 video grid, then text again, per row
    position_ids = torch.randint(0, 300, (3, 2, seq), generator=gen)
    cos, sin = rotary(q, position_ids)
    hf_q, hf_k = module.apply_rotary_pos_emb(q, k, cos, sin)
    to = (lambda t: t) if layout == "b h s d" else (lambda t: t.transpose(1, 2))
    ours_q, ours_k = (to(t) for t in rope(to(q), to(k), positions=position_ids))
    scale = max(q.abs().max(), k.abs().max()).float()
    bound = 8 * EPS32 * (position_ids.amax(0).float()[:, None, :, None] + 16) * scale
    if dtype == torch.bfloat16:
        bound = bound + torch.finfo(torch.bfloat16).eps * scale
    for ours, theirs in ((ours_q, hf_q), (ours_k, hf_k)):
        assert ours.dtype == dtype and ((ours.float() - theirs.float()).abs() <= bound).all()


def _scores(rope, q, k, q_positions, k_positions):
    """Every query against every key, (1, 1, s, s): each rotated at its own positions."""
    return rope(q, positions=q_positions) @ rope(k, positions=k_positions).transpose(-1, -2)


@settings(max_examples=30)
@given(shift=st.lists(st.integers(0, 20), min_size=3, max_size=3),
       assignment=st.sampled_from(["sections", "round_robin"]), frequencies=st.sampled_from(["shared", "per_axis"]),
       interleaved=st.booleans(), seed=st.integers(0, 1000))
def test_scores_depend_only_on_the_difference_of_positions_on_every_axis(shift, assignment, frequencies,
                                                                          interleaved, seed):
    rope = MultiAxisRotaryEmbedding(16, axes={"t": 2, "y": 3, "x": 3}, assignment=assignment,
                                    frequencies=frequencies, interleaved=interleaved, context_length=64)
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, 5, 16, dtype=torch.float64, generator=gen), torch.randn(1, 1, 5, 16, dtype=torch.float64,
                                                                                     generator=gen)
    q_positions, k_positions = torch.randint(0, 40, (2, 3, 5), generator=gen)
    moved = torch.tensor(shift)[:, None]
    rope = rope.double()
    scores = _scores(rope, q, k, q_positions, k_positions)
    torch.testing.assert_close(scores, _scores(rope, q, k, q_positions + moved, k_positions + moved), atol=1e-9,
                               rtol=0)
    # and each pair turns by its own axis's position: with two axes swapped the scores still move with a
    # shift of every axis, but they are not these numbers
    want = _reference(q, q_positions, rope.pair_axes, assignment, frequencies, interleaved) @ _reference(
        k, k_positions, rope.pair_axes, assignment, frequencies, interleaved).transpose(-1, -2)
    torch.testing.assert_close(scores, want, atol=1e-9, rtol=0)
    one_axis = torch.tensor([[0], [7], [0]])  # the queries moved along y alone: other scores
    assert not torch.allclose(scores, _scores(rope, q, k, q_positions + one_axis, k_positions), atol=1e-6)


def _reference(x, positions, pair_axes, assignment, frequencies, interleaved, theta=10_000.0):
    """x (1, 1, s, 16) with its 8 pairs turned, from the definition: axes t, y, x of 2, 3, 3 pairs; pair j of
    axis a at the position on a times theta^(-2j / 16) ("shared") or theta^(-2k / (2 n_a)) for the k-th pair
    of axis a ("per_axis"); sections: t t y y y x x x; round robin: t y x t y x y x."""
    owners = {"sections": [0, 0, 1, 1, 1, 2, 2, 2], "round_robin": [0, 1, 2, 0, 1, 2, 1, 2]}[assignment]
    assert list(pair_axes) == owners
    sizes, seen, out = (2, 3, 3), [0, 0, 0], x.clone()
    for j, a in enumerate(owners):
        k, seen[a] = seen[a], seen[a] + 1
        freq = theta ** (-2 * j / 16) if frequencies == "shared" else theta ** (-2 * k / (2 * sizes[a]))
        angle = positions[a].double() * freq
        first, second = (2 * j, 2 * j + 1) if interleaved else (j, j + 8)
        a_, b_ = x[..., first], x[..., second]
        out[..., first], out[..., second] = a_ * angle.cos() - b_ * angle.sin(), b_ * angle.cos() + a_ * angle.sin()
    return out


@pytest.mark.parametrize("small", ["t", "y", "x"])
def test_a_position_past_a_smaller_axis_is_an_error_naming_the_axis_position_and_limit(small):
    """Each axis has its own context_length: a position within the others' but past its own is a FlexRopeError
    (not an index error from its table), on every path: positions as a tensor, per row, as a dict, a grid, and
    .tables."""
    limits = {"t": 64, "y": 64, "x": 64, small: 4}
    rope = MultiAxisRotaryEmbedding(16, axes={"t": 2, "y": 3, "x": 3}, context_length=limits)
    grid = MultiAxisRotaryEmbedding(16, axes={"t": 2, "y": 3, "x": 3}, layout="b (t y x) h d", context_length=limits)
    axis = "tyx".index(small)
    positions = torch.zeros(3, 6, dtype=torch.long)
    positions[axis, 4] = 9
    match = rf"axis '{small}': positions reach position 9, past the axis's context_length of 4: pass " \
            rf"context_length=\{{\.\.\., '{small}': 10\}} or more"
    q = torch.randn(2, 2, 6, 16)
    calls = [lambda: rope(q, positions=positions), lambda: rope(q, positions=positions[:, None].expand(3, 2, 6)),
             lambda: rope(q, q, positions=dict(zip("tyx", positions))), lambda: rope.tables(positions)]
    for call in calls:
        with pytest.raises(FlexRopeError, match=match):
            call()
    lengths = {"t": 1, "y": 1, "x": 1, small: 5}
    with pytest.raises(FlexRopeError, match=rf"axis '{small}': positions reach position 4, past the axis's "
                                            "context_length of 4"):
        grid(torch.randn(1, 5, 2, 16), **lengths)
    assert rope(q, positions=positions.clamp(max=3)).shape == q.shape  # within every axis's own limit
    negative = positions.clone()
    negative[axis, 0] = -1
    with pytest.raises(FlexRopeError, match=f"axis '{small}': positions hold position -1: positions must be >= 0"):
        rope(q, positions=negative)


def test_grid_form_equals_explicit_positions_and_the_flattening_order_matters():
    rope = MultiAxisRotaryEmbedding(16, axes={"f": 2, "y": 3, "x": 3}, layout="b (f y x) h d", frequencies="per_axis")
    explicit = MultiAxisRotaryEmbedding(16, axes={"f": 2, "y": 3, "x": 3}, layout="b s h d", frequencies="per_axis")
    q = torch.randn(2, 2 * 3 * 4, 2, 16)
    f, y, x = torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(4), indexing="ij")
    positions = {"f": f.flatten(), "y": y.flatten(), "x": x.flatten()}
    assert torch.equal(rope(q, f=2, y=3, x=4), explicit(q, positions=positions))
    # a tensor flattened (x, y) declared as (y, x): a different rotation, not a silent match
    swapped = MultiAxisRotaryEmbedding(16, axes={"f": 2, "y": 3, "x": 3}, layout="b (f x y) h d",
                                       frequencies="per_axis")
    assert not torch.equal(swapped(q, f=2, x=4, y=3), rope(q, f=2, y=3, x=4))


@pytest.mark.parametrize("layout", ["b s h d", "b h s d", "s b h d"])
def test_every_layout_gives_the_same_numbers(layout):
    rope_ref = MultiAxisRotaryEmbedding(16, axes={"t": 4, "y": 2, "x": 2}, layout="b h s d")
    rope = MultiAxisRotaryEmbedding(16, axes={"t": 4, "y": 2, "x": 2}, layout=layout)
    x = torch.randn(2, 3, 7, 16)  # (b h s d)
    positions = torch.randint(0, 100, (3, 2, 7))
    perm = ["bhsd".index(a) for a in layout.replace(" ", "")]
    out = rope(x.permute(perm), positions=positions)
    assert torch.equal(out.permute([perm.index(i) for i in range(4)]), rope_ref(x, positions=positions))


def test_tables_go_to_compute_rope():
    rope = MultiAxisRotaryEmbedding(16, axes={"t": 4, "y": 2, "x": 2}, layout="b s h d")
    x = torch.randn(2, 7, 3, 16)
    positions = torch.randint(0, 100, (3, 2, 7))
    cos, sin = rope.tables(positions)
    assert cos.shape == (2, 7, 16) and torch.equal(compute_rope(x, cos, sin, "b s h d"), rope(x, positions=positions))


def test_one_axis_with_shared_frequencies_is_plain_rope():
    rope = MultiAxisRotaryEmbedding(16, axes={"t": 8}, layout="b h s d", context_length=64)
    cos, sin = flexrope.precompute_rope_params(16, context_length=64)
    x = torch.randn(1, 2, 9, 16)
    positions = torch.arange(3, 12)
    torch.testing.assert_close(rope(x, positions={"t": positions}), compute_rope(x, cos, sin, positions=positions),
                               atol=4 * EPS32 * 8, rtol=0)


ERRORS = [
    (dict(axes={"t": 4, "y": 4, "x": 4}), "rotary_dim=24 is larger than the head dim 16"),
    (dict(axes={"h": 4, "y": 4}), "axis name 'h': expected an identifier other than b, h, s, d"),
    (dict(axes={"t": 0}), r"axes\['t'\]=0: expected a positive number of channel pairs"),
    (dict(axes={"t": 4, "y": 4}, assignment=["t"] * 8), "assignment gives axis 't' 8 pairs but axes gives it 4"),
    (dict(axes={"t": 4, "y": 4}, frequencies="per_axis", theta_base={"t": 100.0}), "theta_base names axes"),
    (dict(axes={"t": 4, "y": 4}, theta_base={"t": 100.0, "y": 1000.0}), "frequencies='shared' uses one theta_base"),
    (dict(axes={"t": 4, "y": 4}, layout="b (t y) (y t) d"), LayoutError),
]


@pytest.mark.parametrize("kwargs, match", ERRORS)
def test_construction_errors(kwargs, match):
    if isinstance(match, type):
        with pytest.raises(match):
            MultiAxisRotaryEmbedding(16, **kwargs)
    else:
        with pytest.raises(FlexRopeError, match=match):
            MultiAxisRotaryEmbedding(16, **kwargs)


CALL_ERRORS = [
    (dict(positions={"t": torch.arange(6)}), r"positions for axes \['t'\]: expected exactly \['t', 'y', 'x'\]"),
    (dict(positions=torch.zeros(2, 6, dtype=torch.long)), "the first dim must be the number of axes, 3"),
    (dict(positions=torch.zeros(3, 5, dtype=torch.long)), r"positions of shape \(3, 5\): expected \(3, 6\)"),
    (dict(positions=torch.full((3, 6), 64)), "axis 't': positions reach position 64, past the axis's context_length of "
                                             r"64: pass context_length=\{\.\.\., 't': 65\} or more"),
    (dict(t=1, y=2, x=4), "grid lengths .* multiply to 8, but the sequence has 6 tokens"),
    (dict(t=1, y=2), "expected t=, y=, x="),
    (dict(), "no positions"),
]


@pytest.mark.parametrize("kwargs, match", CALL_ERRORS)
def test_call_errors_name_the_axes(kwargs, match):
    layout = "b (t y x) h d" if "positions" not in kwargs and kwargs else "b s h d"
    rope = MultiAxisRotaryEmbedding(16, axes={"t": 2, "y": 3, "x": 3}, layout=layout, context_length=64)
    with pytest.raises(FlexRopeError, match=match):
        rope(torch.randn(1, 6, 2, 16), **kwargs)


def test_no_recompile_per_grid_size():
    import torch._dynamo.testing

    torch._dynamo.reset()
    rope = MultiAxisRotaryEmbedding(16, axes={"y": 4, "x": 4}, layout="b (y x) h d", frequencies="per_axis")
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(lambda q, positions: rope(q, positions=positions), backend=counter, fullgraph=True,
                         dynamic=True)
    for y, x in ((3, 4), (5, 6), (7, 2)):
        q = torch.randn(1, y * x, 2, 16)
        positions = torch.stack(torch.unravel_index(torch.arange(y * x), (y, x)))
        assert torch.equal(step(q, positions), rope(q, positions=positions))
    assert counter.frame_count == 1


def test_no_recompile_per_grid_size_with_grid_lengths():
    import torch._dynamo.testing

    torch._dynamo.reset()
    rope = MultiAxisRotaryEmbedding(16, axes={"y": 4, "x": 4}, layout="b (y x) h d", frequencies="per_axis")
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(lambda q, y, x: rope(q, y=y, x=x), backend=counter, fullgraph=True, dynamic=True)
    for y, x in ((3, 4), (5, 6), (7, 2)):
        q = torch.randn(1, y * x, 2, 16)
        assert torch.equal(step(q, y, x), rope(q, y=y, x=x))
    assert counter.frame_count == 1


def test_gradcheck_through_the_per_token_tables():
    rope = MultiAxisRotaryEmbedding(8, axes={"t": 2, "y": 1, "x": 1}, layout="b s h d").double()
    q = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    positions = torch.randint(0, 50, (3, 2, 5))
    assert torch.autograd.gradcheck(lambda q: rope(q, positions=positions), (q,))


def test_a_call_at_the_last_calls_positions_reuses_its_tables_and_any_change_recomputes(monkeypatch):
    """Every block of a diffusion transformer rotates at the same positions: the tables are built once. Reuse
    is decided by value (the same grid lengths; equal positions on the host), so a changed, mutated or bad
    position is never served stale tables."""
    rope = MultiAxisRotaryEmbedding(16, axes={"y": 4, "x": 4}, layout="b (y x) h d", context_length=8)
    fresh = MultiAxisRotaryEmbedding(16, axes={"y": 4, "x": 4}, layout="b (y x) h d", context_length=8)
    built = []
    real = rope._tables
    monkeypatch.setattr(rope, "_tables", lambda *a, **k: built.append(1) or real(*a, **k))
    q = torch.randn(2, 12, 3, 16)
    want = fresh(q, y=3, x=4)
    assert torch.equal(rope(q, y=3, x=4), want) and torch.equal(rope(q, y=3, x=4), want) and len(built) == 1
    assert torch.equal(rope(q, y=4, x=3), fresh(q, y=4, x=3)) and len(built) == 2  # another grid
    positions = {"y": torch.arange(12) % 5, "x": torch.arange(12) % 7}
    want = fresh(q, positions=positions)
    assert torch.equal(rope(q, positions=positions), want) and len(built) == 3
    copied = {name: t.clone() for name, t in positions.items()}  # equal values, other tensors
    assert torch.equal(rope(q, positions=copied), want) and len(built) == 3
    positions["x"][5] = 0  # mutated in place after the call
    assert torch.equal(rope(q, positions=positions), fresh(q, positions=positions)) and len(built) == 4
    positions["x"][5] = 8  # past the axis's 8 positions: still an error
    with pytest.raises(FlexRopeError, match="axis 'x'"):
        rope(q, positions=positions)
    assert torch.equal(rope(q[:1], y=3, x=4), fresh(q[:1], y=3, x=4))  # another batch length: no stale rows
