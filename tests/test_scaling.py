"""Scaling recipes against Hugging Face transformers itself (a test dependency only)."""

import math

import pytest
import torch

import flexrope
from flexrope import FlexRopeError, RotaryEmbedding, precompute_rope_params
from flexrope._scaling import frequencies, parse_scaling

transformers = pytest.importorskip("transformers")
from transformers.models.gpt_neox import modeling_gpt_neox  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.phi3 import modeling_phi3  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
HIDDEN, HEADS, MAX_POS = 256, 4, 512  # head_dim 64
ORIGINAL = 128


def _llama(rope_scaling, theta=10_000.0):
    return transformers.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, max_position_embeddings=MAX_POS,
                                    rope_theta=theta, rope_scaling=rope_scaling)


def _phi3(short, long):
    return transformers.Phi3Config(hidden_size=HIDDEN, num_attention_heads=HEADS, max_position_embeddings=MAX_POS,
                                   original_max_position_embeddings=ORIGINAL,
                                   rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long})


def _neox():
    return transformers.GPTNeoXConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, rotary_pct=0.25,
                                      max_position_embeddings=MAX_POS)


_gen = torch.Generator().manual_seed(0)
SHORT = (1.0 + torch.rand(32, generator=_gen)).tolist()
LONG = (1.0 + 8 * torch.rand(32, generator=_gen)).tolist()

CASES = {
    "default": (lambda: _llama(None), modeling_llama),
    "linear": (lambda: _llama({"rope_type": "linear", "factor": 4.0}), modeling_llama),
    "dynamic": (lambda: _llama({"rope_type": "dynamic", "factor": 2.0}), modeling_llama),
    "llama3": (lambda: _llama({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": ORIGINAL}, theta=500_000.0), modeling_llama),
    "yarn": (lambda: _llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}),
             modeling_llama),
    "yarn-mscale": (lambda: _llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2}),
                    modeling_llama),
    "yarn-attention-factor-no-truncate": (
        lambda: _llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                        "attention_factor": 1.3, "truncate": False}), modeling_llama),
    "longrope": (lambda: _phi3(SHORT, LONG), modeling_phi3),
    "partial-neox": (_neox, modeling_gpt_neox),
}
# (case, sequence length): length-dependent recipes below and above their original length
RUNS = [(name, 96) for name in CASES] + [("dynamic", 1500), ("longrope", 400)]


def _hf(case, seq_len, q, k):
    make_config, module = CASES[case]
    config = make_config()
    rotary = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))(config)
    position_ids = torch.arange(seq_len)[None]
    cos, sin = rotary(q, position_ids)
    return module.apply_rotary_pos_emb(q, k, cos, sin), rotary, config


@pytest.mark.parametrize("case, seq_len", RUNS, ids=[f"{c}-{s}" for c, s in RUNS])
def test_rotated_q_and_k_match_transformers(case, seq_len):
    gen = torch.Generator().manual_seed(seq_len)
    q, k = torch.randn(1, HEADS, seq_len, 64, generator=gen), torch.randn(1, 2, seq_len, 64, generator=gen)
    (hf_q, hf_k), hf_rotary, config = _hf(case, seq_len, q, k)
    rope = RotaryEmbedding.from_hf_config(config, context_length=2048)
    ours_q, ours_k = rope(q, k)
    # The reference's float32 angles are off by up to ~position * eps; ours are float64, rounded once.
    position = torch.arange(seq_len, dtype=torch.float32)[:, None]
    scale = hf_rotary.attention_scaling * max(q.abs().max(), k.abs().max())
    bound = 8 * EPS32 * (position + 16) * scale
    assert ((ours_q - hf_q).abs() <= bound).all(), (ours_q - hf_q).abs().max()
    assert ((ours_k - hf_k).abs() <= bound).all(), (ours_k - hf_k).abs().max()


@pytest.mark.parametrize("case, seq_len", RUNS, ids=[f"{c}-{s}" for c, s in RUNS])
def test_frequencies_and_attention_factor_match_transformers(case, seq_len):
    q = torch.zeros(1, 1, seq_len, 64)
    _, hf_rotary, config = _hf(case, seq_len, q, q)
    settings = flexrope._hf_config.settings_from_hf_config(config)
    recipe = parse_scaling(settings["scaling"], rotary_dim=settings["rotary_dim"], head_dim=64,
                           theta_base=settings["theta_base"])
    inv, attention = frequencies(recipe, settings["rotary_dim"], settings["theta_base"], seq_len)
    torch.testing.assert_close(inv.float(), hf_rotary.inv_freq, rtol=4 * EPS32, atol=0)
    assert attention == pytest.approx(hf_rotary.attention_scaling, rel=1e-12)


def test_dynamic_uses_original_frequencies_below_and_grows_above():
    recipe = parse_scaling({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 512},
                           rotary_dim=64, head_dim=64, theta_base=10_000.0)
    plain, _ = frequencies(None, 64, 10_000.0, 100)
    assert torch.equal(frequencies(recipe, 64, 10_000.0, 512)[0], plain)
    above, _ = frequencies(recipe, 64, 10_000.0, 2048)
    base = 10_000.0 * (2.0 * 2048 / 512 - 1.0) ** (64 / 62)
    torch.testing.assert_close(above, base ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64), rtol=1e-14, atol=0)


def test_dynamic_module_each_call_uses_its_own_length():
    rope = RotaryEmbedding(64, scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 128},
                           context_length=1024)
    x = torch.randn(1, 1, 300, 64)
    cos300, sin300 = precompute_rope_params(64, context_length=300, scaling=rope.scaling)
    assert torch.equal(rope(x), flexrope.compute_rope(x, cos300, sin300))
    short = torch.randn(1, 1, 100, 64)
    cos, sin = precompute_rope_params(64, context_length=100)
    assert torch.equal(rope(short), flexrope.compute_rope(short, cos, sin))


def test_longrope_module_switches_factors_at_the_original_length():
    scaling = {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "factor": 4.0,
               "original_max_position_embeddings": ORIGINAL}
    rope = RotaryEmbedding(64, scaling=scaling, context_length=MAX_POS)
    x = torch.randn(1, 2, 10, 64)
    short_cos, short_sin = precompute_rope_params(64, context_length=ORIGINAL, scaling=scaling)
    long_cos, long_sin = precompute_rope_params(64, context_length=MAX_POS, scaling=scaling)
    assert torch.equal(rope(x, offset=ORIGINAL - 10), flexrope.compute_rope(x, short_cos, short_sin,
                                                                            offset=ORIGINAL - 10))
    assert torch.equal(rope(x, offset=ORIGINAL - 9), flexrope.compute_rope(x, long_cos, long_sin,
                                                                           offset=ORIGINAL - 9))
    # a long call rotates its early tokens with the long factors too, as the reference does
    q, k = torch.randn(1, 2, 1, 64), torch.randn(1, 2, 200, 64)
    _, rk = rope(q, k, offset=199, k_offset=0)
    assert torch.equal(rk, flexrope.compute_rope(k, long_cos, long_sin))


def test_llama3_pairs_unchanged_smoothed_and_divided():
    """theta 500000, r 128, factor 8, 1, 4, L0 8192: pairs 0-28 unchanged, 29-34 smoothed, 35-63 divided by 8."""
    recipe = parse_scaling({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}, rotary_dim=128, head_dim=128,
                           theta_base=500_000.0)
    plain, _ = frequencies(None, 128, 500_000.0, 1)
    scaled, _ = frequencies(recipe, 128, 500_000.0, 1)
    ratio = plain / scaled
    assert torch.equal(ratio[:29], torch.ones(29, dtype=torch.float64))
    assert ((ratio[29:35] > 1) & (ratio[29:35] < 8)).all()
    torch.testing.assert_close(ratio[35:], torch.full((29,), 8.0, dtype=torch.float64), rtol=1e-15, atol=0)


def test_seed_llama3_freq_config_is_accepted():
    seed = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 8192}
    hf = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    a = precompute_rope_params(128, 500_000, 64, scaling=seed)
    b = precompute_rope_params(128, 500_000, 64, scaling=hf)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_yarn_attention_factor_multiplies_cos_and_sin():
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    cos, sin = precompute_rope_params(64, context_length=8, scaling=scaling, dtype=torch.float64)
    assert cos[0, 0].item() == pytest.approx(0.1 * math.log(4.0) + 1.0, rel=1e-15)
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, (0.1 * math.log(4.0) + 1.0) ** 2))


LONG_CONTEXT = 1 << 20
TYPES_AT_1M = {
    "linear": {"rope_type": "linear", "factor": 8.0},
    "dynamic": {"rope_type": "dynamic", "factor": 8.0, "original_max_position_embeddings": 131_072},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 32_768},
    "longrope": {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "factor": 32.0,
                 "original_max_position_embeddings": 32_768},
}


@pytest.mark.parametrize("name", TYPES_AT_1M)
def test_tables_within_1e6_of_float64_truth_at_1m_positions(name):
    scaling = TYPES_AT_1M[name]
    cos, sin = precompute_rope_params(64, theta_base=500_000.0, context_length=LONG_CONTEXT, scaling=scaling)
    recipe = parse_scaling(scaling, rotary_dim=64, head_dim=64, theta_base=500_000.0)
    inv, attention = frequencies(recipe, 64, 500_000.0, LONG_CONTEXT)
    worst = 0.0
    for row in (1, 65_537, 777_777, LONG_CONTEXT - 1):
        for i in range(32):
            angle = row * inv[i].item()
            worst = max(worst, abs(cos[row, i].item() - attention * math.cos(angle)),
                        abs(sin[row, i].item() - attention * math.sin(angle)))
    assert worst < 1e-6


SCALING_ERRORS = [
    ({"rope_type": "ntk"}, "rope_type 'ntk' is unknown"),
    ({"factor": 2.0}, "has no 'rope_type'"),
    ({"rope_type": "linear"}, "missing 'factor'"),
    ({"rope_type": "linear", "factor": -1.0}, r"scaling\['factor'\]=-1.0 .* expected a number > 0"),
    ({"rope_type": "linear", "factor": 2.0, "fudge": 1}, "scaling key 'fudge' is not a parameter"),
    ({"rope_type": "yarn", "factor": 4.0}, "missing 'original_max_position_embeddings'"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "truncate": "yes"},
     r"scaling\['truncate'\]='yes'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 8192}, "high_freq_factor'] must be larger"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 32,
      "original_max_position_embeddings": 128, "factor": 2.0}, r"scaling\['short_factor'\] has 3 entries"),
    ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 128},
     "needs 'factor'"),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 500_000.0}, r"pass theta_base=500000.0"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "means rotary_dim=32"),
    ("linear", "expected None or a dict"),
]


@pytest.mark.parametrize("scaling, match", SCALING_ERRORS, ids=[m for _, m in SCALING_ERRORS])
def test_bad_scaling_names_the_key(scaling, match):
    with pytest.raises(FlexRopeError, match=match):
        precompute_rope_params(64, context_length=16, scaling=scaling)
    with pytest.raises(FlexRopeError, match=match):
        RotaryEmbedding(64, context_length=16, scaling=scaling)


def test_from_hf_config_accepts_a_plain_dict():
    config = {"hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 500000.0,
              "max_position_embeddings": 131072,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    rope = RotaryEmbedding.from_hf_config(config, layout="b s h d", context_length=64)
    assert rope.head_dim == 128 and rope.theta_base == 500000.0 and rope.scaling["rope_type"] == "llama3"
    assert rope.layout.text == "b s h d"


def test_from_hf_config_partial_rotary_from_rotary_pct():
    rope = RotaryEmbedding.from_hf_config({"hidden_size": 256, "num_attention_heads": 4, "rotary_pct": 0.25,
                                           "max_position_embeddings": 64})
    assert rope.rotary_dim == 16 and rope.cos.shape == (64, 16)


def test_from_hf_config_errors_name_what_is_missing():
    with pytest.raises(FlexRopeError, match="from_hf_config: the config has no 'max_position_embeddings'"):
        RotaryEmbedding.from_hf_config({"head_dim": 64})
    with pytest.raises(FlexRopeError, match="neither 'head_dim' nor"):
        RotaryEmbedding.from_hf_config({"max_position_embeddings": 64})


def _llama3_reference(inv, factor, low, high, length):
    """Transformers' llama3 rule, written from its definition, one frequency at a time."""
    out = []
    for f in inv.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < length / high:
            out.append(f)
        elif wavelen > length / low:
            out.append(f / factor)
        else:
            smooth = (length / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def test_llama3_band_edges_hand_built():
    """Wavelengths exactly at L0 / high_freq_factor and L0 / low_freq_factor, and just inside and outside."""
    from flexrope._scaling import _llama3

    length, low, high, factor = 8192, 1.0, 4.0, 8.0
    edges = [length / high, length / low]
    wavelens = [w * k for w in edges for k in (1 - 1e-9, 1.0, 1 + 1e-9)]
    inv = torch.tensor([2 * math.pi / w for w in wavelens], dtype=torch.float64)
    assert [2 * math.pi / f for f in inv.tolist()][1::3] == edges  # the edges are hit exactly
    recipe = parse_scaling({"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                            "original_max_position_embeddings": length}, rotary_dim=12, head_dim=12, theta_base=1e4)
    assert torch.equal(_llama3(inv, recipe), _llama3_reference(inv, factor, low, high, length))


def test_gptj_interleaving_and_rotary_dim_through_from_hf_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTJConfig(n_embd=256, n_head=4, rotary_dim=16, n_positions=128)
    rope = RotaryEmbedding.from_hf_config(config)
    assert rope.interleaved and rope.rotary_dim == 16 and rope.head_dim == 64


def _dynamic_config():
    return transformers.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, max_position_embeddings=512,
                                    rope_scaling={"rope_type": "dynamic", "factor": 2.0})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["b h s d", "b s h d"])
@pytest.mark.parametrize("where", ["700 tokens", "decode at 20000", "positions past the table"])
def test_dynamic_ntk_runs_past_the_original_length_with_transformers_numbers(layout, where, dtype):
    """Dynamic NTK exists to run past max_position_embeddings, which its configs keep at L0: the module
    accepts those positions and rotates them as transformers does (the frequencies of 1 + the largest)."""
    config = _dynamic_config()
    hf_rotary = modeling_llama.LlamaRotaryEmbedding(config)
    rope = RotaryEmbedding.from_hf_config(config, layout=layout)
    gen = torch.Generator().manual_seed(5)
    if where == "700 tokens":
        position_ids, kwargs = torch.arange(700)[None], {}
    elif where == "decode at 20000":
        position_ids, kwargs = torch.tensor([[20_000]]), {"offset": 20_000}
    else:
        position_ids = torch.tensor([[3, 600, 1500, 90, 2047]])
        kwargs = {"positions": position_ids[0]}
    seq_len = position_ids.shape[1]
    q = torch.randn(1, HEADS, seq_len, 64, generator=gen).to(dtype)
    k = torch.randn(1, 2, seq_len, 64, generator=gen).to(dtype)
    cos, sin = hf_rotary(q, position_ids)
    hf_q, hf_k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    to = (lambda t: t) if layout == "b h s d" else (lambda t: t.transpose(1, 2))
    ours_q, ours_k = (to(t) for t in rope(to(q), to(k), **kwargs))
    scale = max(q.abs().max(), k.abs().max()).float()
    bound = 8 * EPS32 * (position_ids[0].float()[:, None] + 16) * scale
    if dtype == torch.bfloat16:  # both sides round the result: half an ulp each
        bound = bound + torch.finfo(torch.bfloat16).eps * scale
    for ours, theirs in ((ours_q, hf_q), (ours_k, hf_k)):
        assert ours.dtype == dtype and ((ours.float() - theirs.float()).abs() <= bound).all()


def test_dynamic_ntk_decoding_step_reads_only_its_rows(monkeypatch):
    """A step at offset 100,000 computes the angles of its one position, once for q and k, not of 100,001
    rows."""
    from flexrope import _module

    rows = []
    real = _module.tables_at
    monkeypatch.setattr(_module, "tables_at", lambda inv, positions, **kw: rows.append(len(positions)) or real(
        inv, positions, **kw))
    rope = RotaryEmbedding.from_hf_config(_dynamic_config())
    rope(torch.randn(1, 4, 1, 64), torch.randn(1, 2, 1, 64), offset=100_000)
    assert rows == [1]


def test_dynamic_ntk_negative_positions_are_still_errors():
    rope = RotaryEmbedding.from_hf_config(_dynamic_config())
    with pytest.raises(FlexRopeError, match="hold position -1: positions must be >= 0"):
        rope(torch.randn(1, 4, 3, 64), positions=torch.tensor([0, -1, 2]))


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
# Each a recipe transformers' own initialisation functions (ROPE_INIT_FUNCTIONS) compute from the same dict.
RECIPES = {
    "yarn-mscale-only": {**YARN, "mscale": 0.707},
    "yarn-mscale-all-dim-only": {**YARN, "mscale_all_dim": 0.8},
    "yarn-both-mscales": {**YARN, "mscale": 1.3, "mscale_all_dim": 0.6},
    "yarn-mscale-factor-16": {**YARN, "factor": 16.0, "mscale": 2.0},
    "proportional-factor": {"rope_type": "proportional", "factor": 8.0, "partial_rotary_factor": 0.25},
    "proportional-factor-whole": {"rope_type": "proportional", "factor": 3.0},
    "proportional-no-factor": {"rope_type": "proportional", "partial_rotary_factor": 0.5},
}


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_equal_transformers_init_functions(name):
    """YaRN's attention factor with mscale but not mscale_all_dim (0.1 ln(factor) + 1: mscale alone is
    ignored), and the other way round, and both; Gemma 4's proportional frequencies divided by a factor. The
    inverse frequencies and the factor on cos and sin as transformers computes them, and the tables with them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = RECIPES[name]
    config = transformers.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, max_position_embeddings=MAX_POS,
                                      rope_parameters={**scaling, "rope_theta": 10_000.0})
    hf_inv, hf_attention = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    recipe = parse_scaling(scaling, rotary_dim=64, head_dim=64, theta_base=10_000.0)
    inv, attention = frequencies(recipe, 64, 10_000.0, 96)
    torch.testing.assert_close(inv.float(), hf_inv, rtol=4 * EPS32, atol=0)
    assert attention == pytest.approx(hf_attention, rel=1e-12)
    cos, sin = precompute_rope_params(64, context_length=16, scaling=scaling, dtype=torch.float64)
    angles = torch.arange(16, dtype=torch.float64)[:, None] * hf_inv.double()
    torch.testing.assert_close(cos[:, :32], hf_attention * angles.cos(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin[:, :32], hf_attention * angles.sin(), rtol=0, atol=1e-5)
