"""flexrope.testing: check_rope passes real RoPEs and names the mistake of wrong ones; check_attention; the
strategies; hypothesis stays optional."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import flexrope
from flexrope import FlexRopeError, compute_rope, precompute_rope_params
from flexrope.testing import check_attention, check_rope, laid_out, layouts

from .book import seed_compute_rope, seed_precompute_rope_params

COS, SIN = seed_precompute_rope_params(64)


def _fails(fn, layout, **kwargs):
    with pytest.raises(AssertionError) as raised:
        check_rope(fn, layout, **kwargs)
    return str(raised.value)


def _book(cos=COS, sin=SIN):
    return lambda x: seed_compute_rope(x, cos, sin)


def _flexrope(layout, length=64, theta_base=10_000, **kwargs):
    cos, sin = precompute_rope_params(64, theta_base, length, rotary_dim=kwargs.get("rotary_dim"))
    return lambda x, positions=None: compute_rope(x, cos, sin, layout, positions=positions, **kwargs)


# -- the book's RoPE (LLMs-from-scratch) ----------------------------------------------------------------------


def test_the_books_rope_passes_on_the_layout_it_expects():
    check_rope(_book(), "b h s d", head_dim=64)


def test_the_books_rope_on_bshd_is_diagnosed_as_rotating_by_the_head_index():
    message = _fails(_book(), "b s h d", head_dim=64)
    assert "the sequence is read from dim 2 (h) instead of dim 1 (s)" in message
    assert "each token is rotated by its head index" in message


def test_a_rope_reading_bhsd_called_on_sbhd_is_diagnosed_as_rotating_by_the_batch_index():
    message = _fails(_book(), "s b h d", head_dim=64)  # dim 2 of (s b h d) is h
    assert "dim 2 (h) instead of dim 0 (s)" in message
    message = _fails(_flexrope("s b h d"), "b s h d", head_dim=64)  # reads (b s h d) as (s b h d)
    assert "dim 0 (b) instead of dim 1 (s): each token is rotated by its batch index" in message


# -- Hugging Face's and GPT-J's rotations, as users wrap them ---------------------------------------------------


def test_hugging_face_apply_rotary_pos_emb_wrapped_passes_in_both_layouts():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = pytest.importorskip("transformers").LlamaConfig(hidden_size=256, num_attention_heads=4)
    rotary = llama.LlamaRotaryEmbedding(config)

    def bhsd(x, positions):
        cos, sin = rotary(x, positions)  # (b, s, d), float32 angles, as the model makes them
        return llama.apply_rotary_pos_emb(x, x, cos, sin)[0]

    def bshd(x, positions):
        cos, sin = rotary(x, positions)
        return llama.apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=2)[0]

    check_rope(bhsd, "b h s d", head_dim=64, positions=True)  # below 64 by default: float32 angles pass
    check_rope(bshd, "b s h d", head_dim=64, positions=True)
    check_rope(lambda x: llama.apply_rotary_pos_emb(x, x, COS[None, : x.shape[2]], SIN[None, : x.shape[2]])[0],
               "b h s d", head_dim=64)
    message = _fails(bhsd, "b s h d", head_dim=64, positions=True, max_position=16)  # its per-token tables catch it
    assert "bhsd(x) with x of shape (2, 7, 3, 64) laid out as 'b s h d' raised RuntimeError" in message


def test_gptj_interleaved_rotation_declared_half_split_is_diagnosed():
    gptj = pytest.importorskip("transformers.models.gptj.modeling_gptj")
    table = gptj.create_sinusoidal_positions(64, 64)

    def rope(x):  # (b s h d), as GPT-J's attention holds it
        sin, cos = torch.split(table[None, : x.shape[1]], 32, dim=-1)
        return gptj.apply_rotary_pos_emb(x, sin, cos)

    check_rope(rope, "b s h d", head_dim=64, interleaved=True)
    message = _fails(rope, "b s h d", head_dim=64)
    assert "pairs 2i with 2i+1 (interleaved) but half-split was declared" in message


def test_meta_style_complex_rope_declared_half_split_is_diagnosed():
    freqs = 1.0 / (10_000 ** (torch.arange(0, 64, 2).double() / 64))
    freqs_cis = torch.polar(torch.ones(64, 32, dtype=torch.float64), torch.outer(torch.arange(64.0), freqs))

    def rope(x):  # Llama's reference code: (b s h d), channels (2i, 2i+1) as one complex number
        z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(z * freqs_cis[: x.shape[1], None, :]).flatten(3).to(x.dtype)

    check_rope(rope, "b s h d", head_dim=64, interleaved=True)
    assert "(interleaved) but half-split was declared" in _fails(rope, "b s h d", head_dim=64)
    half_split = _flexrope("b s h d")
    assert "pairs i with i + r/2 (half-split) but interleaved was declared" in _fails(
        half_split, "b s h d", head_dim=64, interleaved=True)


# -- frequencies and precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("used, declared", [(10_000, 500_000), (500_000, 10_000), (1_000_000, 10_000),
                                            (123_456, 10_000)])
def test_a_wrong_base_is_named(used, declared):
    message = _fails(_book(*seed_precompute_rope_params(64, theta_base=used)), "b h s d", head_dim=64,
                     theta_base=declared)
    assert f"theta {used} where {declared} was declared" in message


def test_float32_angles_at_long_positions_are_diagnosed_and_float64_ones_pass():
    def rope(inv_freq):
        def fn(x, positions):  # (b s h d), positions (b, s): the rows of the book's table, made on the fly
            angles = positions[..., None].to(inv_freq.dtype) * inv_freq
            c, s = (t.float().repeat(1, 1, 2)[:, :, None, :] for t in (angles.cos(), angles.sin()))
            return x * c + torch.cat((-x[..., 32:], x[..., :32]), dim=-1) * s
        return fn

    book = 1.0 / (10_000 ** (torch.arange(0, 64, 2).float() / 64))  # the book's float32 inv_freq and angles
    message = _fails(rope(book), "b s h d", head_dim=64, positions=True, max_position=2**20)
    assert "angles in float32 lose" in message and "at position 1,048,5" in message
    check_rope(rope(10_000 ** (-torch.arange(0, 64, 2).double() / 64)), "b s h d", head_dim=64, positions=True,
               max_position=2**20)


@pytest.mark.parametrize("frequencies", ["rotary_dim", "head_dim"])
def test_a_partial_rotation_names_how_many_channels_rotate(frequencies):
    inv = 10_000 ** (-torch.arange(0, 32, 2).double() / (32 if frequencies == "rotary_dim" else 64))
    angle = torch.arange(64.0).double()[:, None] * inv

    def rope(x):  # (b h s d), the first 32 channels rotate, half-split among them
        c, s = angle[: x.shape[2]].cos().repeat(1, 2), angle[: x.shape[2]].sin().repeat(1, 2)
        head, rest = x[..., :32].double(), x[..., 32:]
        turned = head * c + torch.cat((-head[..., 16:], head[..., :16]), dim=-1) * s
        return torch.cat((turned.to(x.dtype), rest), dim=-1)

    message = _fails(rope, "b h s d", head_dim=64)
    assert "only the first 32 channels rotate" in message
    source = "rotary_dim (32)" if frequencies == "rotary_dim" else "the head dim (64)"
    assert f"frequencies from {source}" in message
    if frequencies == "rotary_dim":
        check_rope(rope, "b h s d", head_dim=64, rotary_dim=32)
    assert "all 64 channels rotate" in _fails(_flexrope("b h s d"), "b h s d", head_dim=64, rotary_dim=32)


@pytest.mark.parametrize("mistake, words", [
    (lambda x: compute_rope(x, *precompute_rope_params(64), inverse=True), "rotation by the negated angle"),
    (lambda x: compute_rope(x, *precompute_rope_params(64), offset=1), "positions start at 1, not 0"),
    (lambda x: compute_rope(x, *reversed(precompute_rope_params(64))), "cos and sin are swapped"),
    (lambda x: x.clone(), "nothing rotates"),
])
def test_the_usual_mistakes_are_named(mistake, words):
    assert words in _fails(mistake, "b h s d", head_dim=64)


def test_drawn_positions_of_the_first_row_for_every_row_are_named():
    cos, sin = precompute_rope_params(64, context_length=4096)
    message = _fails(lambda x, p: compute_rope(x, cos, sin, "b s h d", positions=p[0]), "b s h d", head_dim=64,
                     positions=True)
    assert "every batch row is rotated by the positions of the first row" in message


def test_a_single_wrong_element_is_located():
    cos, sin = precompute_rope_params(64)

    def rope(x):  # (b s h d): one element off
        y = compute_rope(x, cos, sin, "b s h d")
        if x.shape == (2, 7, 3, 64):
            y[1, 4, 2, 37] += 0.25
        return y

    message = _fails(rope, "b s h d", head_dim=64)
    assert "no known mistake explains it" in message
    assert "at token 4 (position 4), head 2, channel 37 of batch row 1: x[1, 4, 2, 37]" in message
    assert "(1 element of" in message


# -- what passes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, kwargs", [
    ("b s h d", {}), ("s b h d", {"interleaved": True}), ("h s b d", {"rotary_dim": 32}), ("b s (h d)", {"h": 4}),
    ("... s h d", {}), ("s d", {}), ("(b h) s d", {"b": 2}),
])
def test_flexrope_itself_passes_in_every_kind_of_layout(layout, kwargs):
    lengths = {k: v for k, v in kwargs.items() if k in "bh"}
    options = {k: v for k, v in kwargs.items() if k not in "bh"}
    cos, sin = precompute_rope_params(64, rotary_dim=options.get("rotary_dim"))
    check_rope(lambda x: compute_rope(x, cos, sin, layout, **options, **lengths), layout, head_dim=64, **kwargs)


def test_scaling_recipes_and_drawn_positions_pass():
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    cos, sin = precompute_rope_params(64, theta_base=500_000, context_length=4096, scaling=scaling)
    rope = lambda x, positions: compute_rope(x, cos, sin, "b s h d", positions=positions)  # noqa: E731
    check_rope(rope, "b s h d", head_dim=64, theta_base=500_000, scaling=scaling, positions=True)
    message = _fails(rope, "b s h d", head_dim=64, theta_base=500_000, positions=True)
    assert "was declared" not in message and "no known mistake explains it" in message
    plain = _flexrope("b s h d", length=4096, theta_base=500_000)
    assert "the yarn scaling is not applied" in _fails(plain, "b s h d", head_dim=64, theta_base=500_000,
                                                       scaling=scaling, positions=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_pass_and_the_book_bug_is_still_named(dtype):
    cos, sin = precompute_rope_params(64, dtype=torch.float64)
    check_rope(lambda x: compute_rope(x, cos, sin, "b s h d"), "b s h d", head_dim=64, dtype=dtype)
    book = lambda x: seed_compute_rope(x, cos.to(dtype), sin.to(dtype))  # noqa: E731
    assert "rotated by its head index" in _fails(book, "b s h d", head_dim=64, dtype=dtype)


# -- what fn returns, and check_rope's own arguments -------------------------------------------------------------


@pytest.mark.parametrize("fn, words", [
    (lambda x: (x, x), "returned a tuple: expected a tensor of x's shape (2, 7, 3, 64) (return the rotated x alone)"),
    (lambda x: x.transpose(1, 2), "returned shape (2, 3, 7, 64): a RoPE keeps x's shape: the same lengths in"),
    (lambda x: x.double(), "returned torch.float64: a RoPE keeps x's dtype torch.float32"),
    (lambda x: x[..., :32], "returned shape (2, 7, 3, 32)"),
])
def test_a_wrong_kind_of_output_is_a_clear_assertion(fn, words):
    assert words in _fails(fn, "b s h d", head_dim=64)


def test_an_exception_in_fn_says_which_call_raised_it():
    def rope(x):
        raise RuntimeError("boom")

    assert "rope(x) with x of shape (2, 7, 3, 64) laid out as 'b s h d' raised RuntimeError: boom" in _fails(
        rope, "b s h d", head_dim=64)


@pytest.mark.parametrize("kwargs, words", [
    ({"layout": "b s h"}, "no 'd'"),
    ({"rotary_dim": 66}, "larger than the head dim"),
    ({"max_position": 100}, "without positions=True"),
    ({"max_position": 4, "positions": True}, "at least 12"),
    ({"theta_base": 1}, "theta_base=1"),
    ({"dtype": torch.int64}, "dtype=torch.int64"),
])
def test_bad_arguments_to_check_rope_are_flexrope_errors(kwargs, words):
    arguments = {"layout": "b s h d", "head_dim": 64, **kwargs}
    with pytest.raises(FlexRopeError, match="check_rope") as raised:
        check_rope(lambda x: x, arguments.pop("layout"), **arguments)
    assert words in str(raised.value)


def test_the_input_is_compared_as_given_even_when_fn_writes_into_it():
    cos, sin = precompute_rope_params(64)
    check_rope(lambda x: compute_rope(x, cos, sin, "b s h d", inplace=True), "b s h d", head_dim=64)


# -- check_attention ---------------------------------------------------------------------------------------------

ROPE_COS, ROPE_SIN = seed_precompute_rope_params(16)


def _sdpa_bshd(q, k, v, causal=True):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)


def _book_attention_on_bshd(q, k, v):  # the book's bug: (b s h d) rotated as if it were (b h s d)
    return _sdpa_bshd(seed_compute_rope(q, ROPE_COS, ROPE_SIN), seed_compute_rope(k, ROPE_COS, ROPE_SIN), v)


def _right_attention_on_bshd(q, k, v):
    q, k = (seed_compute_rope(t.transpose(1, 2), ROPE_COS, ROPE_SIN).transpose(1, 2) for t in (q, k))
    return _sdpa_bshd(q, k, v)


def test_check_attention_passes_rope_attentions_causal_or_not():
    check_attention(_right_attention_on_bshd, "b s h d")
    rope = flexrope.RotaryEmbedding(16, layout="b s h d", interleaved=True, theta_base=500_000)
    check_attention(lambda q, k, v: _sdpa_bshd(*rope(q, k), v, causal=False), "b s h d")
    grouped = flexrope.RotaryEmbedding(16, layout="b s (h d)")

    def attention(q, k, v):  # (b s (h d)) from the projections
        q, k = grouped(q, k)
        return _sdpa_bshd(*(t.unflatten(-1, (4, 16)) for t in (q, k, v))).flatten(-2)

    check_attention(attention, "b s (h d)", h=4)


def test_check_attention_catches_the_books_bug_and_an_attention_without_rope():
    for attention in (_book_attention_on_bshd, _sdpa_bshd):
        with pytest.raises(AssertionError, match="position-blind") as raised:
            check_attention(attention, "b s h d")
        assert "rotated by their head index" in str(raised.value)


def test_check_attention_catches_absolute_positions():
    table = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))

    def attention(q, k, v):  # positions added to q and k: scores depend on i and j, not on i - j alone
        s = q.shape[1]
        return _sdpa_bshd(q + table[:s, None], k + table[:s, None], v)

    with pytest.raises(AssertionError, match="depend on absolute positions"):
        check_attention(attention, "b s h d")


def test_check_attention_catches_attention_along_another_axis():
    rope = flexrope.RotaryEmbedding(16, layout="b s h d")

    def attention(q, k, v):  # scaled_dot_product_attention on (b s h d) as if (b h s d): attends over heads
        return F.scaled_dot_product_attention(*rope(q, k), v)

    with pytest.raises(AssertionError, match="is not a weighted mean of the values of the tokens along dim 1"):
        check_attention(attention, "b s h d")


# -- strategies and the optional dependency ----------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(layout=layouts(), data=st.data())
def test_laid_out_tensors_are_their_canonical_view_in_the_declared_layout(layout, data):
    case = data.draw(laid_out(layout))
    parsed = flexrope._layout.parse_layout(layout, tuple(sorted(case.lengths.items())))
    assert torch.equal(parsed.canonical(case.x), case.canonical)


def test_import_flexrope_leaves_hypothesis_out_and_without_it_the_strategies_say_what_to_install():
    code = (
        "import sys, flexrope\n"
        "print(sorted({'hypothesis', 'flexrope.testing'} & set(sys.modules)))\n"
        "sys.modules['hypothesis'] = None  # as if it were not installed\n"
        "import flexrope.testing as t\n"
        "cos, sin = flexrope.precompute_rope_params(2)\n"
        "t.check_rope(lambda x: flexrope.compute_rope(x, cos, sin, 's d'), 's d', head_dim=2)\n"
        "try:\n    t.layouts\nexcept ImportError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[]\n")
    assert "flexrope.testing.layouts is a hypothesis strategy" in result.stdout
    assert "pip install flexrope[testing]" in result.stdout
