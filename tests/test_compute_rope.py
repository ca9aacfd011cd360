import einops
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flexrope
from flexrope import FlexRopeError, compute_rope, precompute_rope_params, testing
from flexrope.testing import layout_cases

from . import book

CANONICAL = "b h s d"


def _tables(d, length=64, dtype=torch.float32, rotary_dim=None):
    return precompute_rope_params(d, context_length=length, dtype=dtype, rotary_dim=rotary_dim)


def _positions(b, s, offset=0):
    return (offset + torch.arange(s)).expand(b, s)


def _inverse(pattern):
    source, target = pattern.split(" -> ")
    return f"{target} -> {source}"


# -- laws of the rotation, across layouts ------------------------------------------------------------------


@given(case=layout_cases(), interleaved=st.booleans())
def test_layout_equivariance_is_bitwise(case, interleaved):
    text, lengths, canonical, x, pattern = case
    cos, sin = _tables(canonical.shape[-1])
    lead = "... " if text.startswith("...") else ""
    rotated_canonical = compute_rope(canonical, cos, sin, lead + CANONICAL, interleaved=interleaved)
    rotated = compute_rope(x, cos, sin, text, interleaved=interleaved, **lengths)
    assert torch.equal(rotated, einops.rearrange(rotated_canonical, pattern, **lengths).contiguous())


@given(case=layout_cases(max_lead=0), interleaved=st.booleans())
def test_matches_float64_loop_in_every_layout(case, interleaved):
    text, lengths, canonical, x, pattern = case
    cos, sin = _tables(canonical.shape[-1], dtype=torch.float64)
    rotated = compute_rope(x.double(), cos, sin, text, interleaved=interleaved, **lengths)
    b, _, s, _ = canonical.shape
    expected = testing.rope_loop(canonical, _positions(b, s), interleaved=interleaved)
    torch.testing.assert_close(
        einops.rearrange(rotated, _inverse(pattern), **lengths), expected, atol=testing.tolerance(torch.float64),
        rtol=0,
    )


@given(case=layout_cases(), interleaved=st.booleans())
def test_norm_of_every_pair_is_preserved(case, interleaved):
    text, lengths, canonical, x, pattern = case
    d = canonical.shape[-1]
    cos, sin = _tables(d, dtype=torch.float64)
    y = compute_rope(x.double(), cos, sin, text, interleaved=interleaved, **lengths)
    yc = einops.rearrange(y, _inverse(pattern), **lengths)
    xc = canonical.double()
    for p, q in testing.pair_indices(d, interleaved):
        torch.testing.assert_close(yc[..., p] ** 2 + yc[..., q] ** 2, xc[..., p] ** 2 + xc[..., q] ** 2)


@given(case=layout_cases(), interleaved=st.booleans())
def test_position_zero_is_the_identity(case, interleaved):
    text, lengths, canonical, x, _ = case
    cos, sin = _tables(canonical.shape[-1])
    zeros = torch.zeros(canonical.shape[-2], dtype=torch.long)
    assert torch.equal(compute_rope(x, cos, sin, text, positions=zeros, interleaved=interleaved, **lengths), x)


@given(
    m=st.integers(0, 200), n=st.integers(0, 200), shift=st.integers(0, 300), d=st.sampled_from([2, 8, 16, 64]),
    interleaved=st.booleans(), layout=st.sampled_from(["b h s d", "b s h d", "s b h d", "s d"]),
)
def test_scores_depend_only_on_relative_position(m, n, shift, d, interleaved, layout):
    cos, sin = _tables(d, length=512, dtype=torch.float64)
    gen = torch.Generator().manual_seed(d)
    shape = {"b h s d": (1, 1, 1, d), "b s h d": (1, 1, 1, d), "s b h d": (1, 1, 1, d), "s d": (1, d)}[layout]
    q, k = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))

    def score(i, j):
        rq = compute_rope(q, cos, sin, layout, offset=i, interleaved=interleaved)
        rk = compute_rope(k, cos, sin, layout, offset=j, interleaved=interleaved)
        return (rq * rk).sum()

    torch.testing.assert_close(score(m, n), score(m + shift, n + shift), atol=1e-10, rtol=0)


@given(case=layout_cases(), interleaved=st.booleans(), offset=st.integers(0, 50))
def test_negated_sin_undoes_the_rotation(case, interleaved, offset):
    text, lengths, canonical, x, _ = case
    cos, sin = _tables(canonical.shape[-1], dtype=torch.float64)
    x = x.double()
    y = compute_rope(x, cos, sin, text, offset=offset, interleaved=interleaved, **lengths)
    back = compute_rope(y, cos, -sin, text, offset=offset, interleaved=interleaved, **lengths)
    torch.testing.assert_close(back, x, atol=1e-12, rtol=0)


# -- numbers against independent references and peers -----------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_complex_formulation(interleaved, dtype):
    x = torch.randn(2, 3, 17, 32, dtype=dtype, generator=torch.Generator().manual_seed(0))
    cos, sin = _tables(32, length=100, dtype=torch.float64)
    y = compute_rope(x, cos, sin, offset=5, interleaved=interleaved)
    expected = testing.rope_complex(x, _positions(2, 17, offset=5), interleaved=interleaved)
    torch.testing.assert_close(y.double(), expected, atol=testing.tolerance(dtype, 4.0), rtol=0)


def test_matches_hugging_face_llama_bitwise():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 9, 64, generator=gen), torch.randn(2, 2, 9, 64, generator=gen)
    cos, sin = _tables(64)
    positions = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    hf_q, hf_k = llama.apply_rotary_pos_emb(q, k, cos[positions], sin[positions], unsqueeze_dim=1)
    assert torch.equal(compute_rope(q, cos, sin, positions=positions), hf_q)
    assert torch.equal(compute_rope(k, cos, sin, positions=positions), hf_k)


def test_half_width_tables_give_the_same_result():
    x = torch.randn(2, 3, 7, 16)
    cos, sin = _tables(16)
    full = compute_rope(x, cos, sin)
    assert torch.equal(compute_rope(x, cos[:, :8].contiguous(), sin[:, :8].contiguous(), rotary_dim=16), full)


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_leaves_the_tail_untouched(interleaved):
    x = torch.randn(2, 3, 7, 16, dtype=torch.float64)
    cos, sin = _tables(16, rotary_dim=8, dtype=torch.float64)
    y = compute_rope(x, cos, sin, rotary_dim=8, interleaved=interleaved)
    assert torch.equal(y[..., 8:], x[..., 8:])
    expected = testing.rope_loop(x[..., :8], _positions(2, 7), interleaved=interleaved)
    torch.testing.assert_close(y[..., :8], expected, atol=1e-12, rtol=0)


# -- the seed's scenario -----------------------------------------------------------------------------------


def test_seed_example_declared_as_b_s_h_d_equals_corrected_b_h_s_d():
    """The book's example built (b, s, h, d) queries for a function that wants (b, h, s, d)."""
    batch_size, context_len, num_heads, head_dim = 2, 5, 4, 16
    cos, sin = book.seed_precompute_rope_params(head_dim, context_length=context_len)
    queries_bshd = torch.randn(batch_size, context_len, num_heads, head_dim, generator=torch.Generator().manual_seed(3))
    queries_bhsd = queries_bshd.transpose(1, 2).contiguous()

    fix_layout = compute_rope(queries_bshd, cos, sin, layout="b s h d")
    fix_tensor = compute_rope(queries_bhsd, cos, sin)

    assert torch.equal(fix_layout.transpose(1, 2), fix_tensor)
    assert torch.equal(fix_tensor, book.seed_compute_rope(queries_bhsd, cos, sin))
    # The seed's silent bug: the same call on (b, s, h, d) rotates by head index.
    wrong = book.seed_compute_rope(queries_bshd, cos, sin)
    assert not torch.allclose(wrong, fix_layout)


def test_seed_bug_shape_is_an_error_when_the_layout_is_declared():
    cos, sin = book.seed_precompute_rope_params(16, context_length=4096)
    x = torch.randn(1, 8192, 4, 16)  # (b, s, h, d), seq longer than the table
    with pytest.raises(flexrope.LayoutError, match=r"dim 1 \(axis h\) has length 8192 but h=4"):
        compute_rope(x, cos, sin, layout="b h s d", h=4)
    with pytest.raises(FlexRopeError, match="past the table's 4096 positions"):
        compute_rope(x, cos, sin, layout="b s h d")


# -- dtypes, memory, positions --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["b h s d", "b s h d", "s b h d"])
def test_half_precision_is_rotated_in_float32(dtype, layout):
    x = torch.randn(2, 3, 5, 32).to(dtype)
    cos, sin = _tables(32)
    y = compute_rope(x, cos, sin, layout)
    assert y.dtype == dtype
    expected = compute_rope(x.float(), cos, sin, layout).to(dtype)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("layout", ["b h s d", "b s h d", "s b h d", "h s b d"])
def test_output_is_laid_out_like_the_input_and_input_untouched(layout):
    x = torch.randn(2, 3, 5, 8)
    before = x.clone()
    cos, sin = _tables(8)
    y = compute_rope(x, cos, sin, layout)
    assert y.stride() == x.stride() and y.is_contiguous()
    assert torch.equal(x, before)
    permuted = x.permute(2, 0, 3, 1)[..., :].permute(1, 3, 0, 2)  # a non-contiguous view of the same memory
    assert compute_rope(permuted.transpose(1, 2), cos, sin, layout).stride() == permuted.transpose(1, 2).stride()


def test_inplace_writes_into_x_and_returns_it():
    x = torch.randn(2, 5, 3, 8)
    cos, sin = _tables(8)
    expected = compute_rope(x, cos, sin, "b s h d", offset=3)
    y = compute_rope(x, cos, sin, "b s h d", offset=3, inplace=True)
    assert y is x and torch.equal(x, expected)


def test_canonical_view_is_never_a_copy():
    parsed = flexrope._layout.parse_layout("s b (h d)", (("h", 4),))
    x = torch.randn(5, 2, 32)
    assert parsed.canonical(x).untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def test_per_row_offset_tensor_equals_per_row_calls():
    x = torch.randn(3, 4, 6, 8)
    cos, sin = _tables(8)
    offsets = torch.tensor([0, 5, 11])
    y = compute_rope(x, cos, sin, offset=offsets)
    for row, start in enumerate(offsets.tolist()):
        assert torch.equal(y[row], compute_rope(x[row : row + 1], cos, sin, offset=start)[0])


def test_positions_1d_and_2d_and_offset_agree():
    x = torch.randn(2, 4, 6, 8)
    cos, sin = _tables(8)
    by_offset = compute_rope(x, cos, sin, offset=7)
    assert torch.equal(compute_rope(x, cos, sin, positions=torch.arange(7, 13)), by_offset)
    assert torch.equal(compute_rope(x, cos, sin, positions=torch.arange(7, 13).expand(2, 6)), by_offset)


def test_tables_in_float64_rotate_float32_in_float32():
    x = torch.randn(1, 2, 3, 8)
    cos64, sin64 = _tables(8, dtype=torch.float64)
    cos32, sin32 = _tables(8)
    assert compute_rope(x, cos64, sin64).dtype == torch.float32
    torch.testing.assert_close(compute_rope(x, cos64, sin64), compute_rope(x, cos32, sin32))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["b h s d", "b s h d"])
def test_inverse_undoes_the_rotation_and_is_the_negated_angle(interleaved, layout):
    cos, sin = flexrope.precompute_rope_params(16, context_length=64, dtype=torch.float64)
    x = torch.randn(2, 5, 3, 16, dtype=torch.float64)
    if layout == "b h s d":
        x = x.transpose(1, 2)
    positions = torch.tensor([[3, 9, 1, 40, 7], [0, 0, 5, 6, 63]])
    kwargs = dict(positions=positions, interleaved=interleaved)
    rotated = flexrope.compute_rope(x, cos, sin, layout, **kwargs)
    torch.testing.assert_close(flexrope.compute_rope(rotated, cos, sin, layout, inverse=True, **kwargs), x,
                               atol=1e-13, rtol=0)
    assert torch.equal(flexrope.compute_rope(x, cos, sin, layout, inverse=True, **kwargs),
                       flexrope.compute_rope(x, cos, -sin, layout, **kwargs))


def test_re_positioning_cached_keys_equals_rotating_them_there():
    """StreamingLLM-style eviction: keys rotated at p move to p' by the rotation of p' - p (either sign)."""
    cos, sin = flexrope.precompute_rope_params(16, context_length=64, dtype=torch.float64)
    keys = torch.randn(1, 2, 6, 16, dtype=torch.float64)  # (b h s d)
    p = torch.tensor([4, 10, 11, 12, 30, 31])
    p_new = torch.tensor([4, 5, 6, 7, 8, 40])  # evicted tokens close the gaps; one key moves forward
    cached = flexrope.compute_rope(keys, cos, sin, positions=p)
    delta = p_new - p
    forward, backward = delta.clamp(min=0), (-delta).clamp(min=0)
    moved = flexrope.compute_rope(flexrope.compute_rope(cached, cos, sin, positions=forward), cos, sin,
                                  positions=backward, inverse=True)
    torch.testing.assert_close(moved, flexrope.compute_rope(keys, cos, sin, positions=p_new), atol=1e-12, rtol=0)


@pytest.mark.parametrize("layout", ["b h s d", "b s h d"])
def test_per_token_tables_from_a_transformers_rotary_module(layout):
    """The (b, s, head_dim) cos and sin a model's own rotary module returns drop straight in."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=128)
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    q = torch.randn(2, 4, 7, 64)  # (b h s d)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [9, 3, 40, 41, 42, 0, 1]])
    cos, sin = rotary(q, position_ids)  # (b, s, 64) each
    expected, _ = modeling_llama.apply_rotary_pos_emb(q, q, cos, sin)
    x = q if layout == "b h s d" else q.transpose(1, 2)
    got = flexrope.compute_rope(x, cos, sin, layout)
    assert torch.equal(got if layout == "b h s d" else got.transpose(1, 2), expected)
    shared = flexrope.compute_rope(x, cos[:1], sin[:1], layout)  # (1, s, d): the same angles for every row
    assert torch.equal(shared[0], got[0])
