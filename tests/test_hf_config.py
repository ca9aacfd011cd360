"""Checkpoints, round two, against transformers' own rotary modules and apply functions (test-only
dependency): Gemma 3 and 4 per layer type (proportional), DeepSeek-V3 (MLA, interleaved, YaRN with
mscale_all_dim), GPT-OSS (YaRN without truncation), GPT-J (config object and config.json dict)."""

import pytest
import torch

from flexrope import FlexRopeError, MultiAxisRotaryEmbedding, RotaryEmbedding, _hf_config

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3  # noqa: E402
from transformers.models.gemma3 import modeling_gemma3  # noqa: E402
from transformers.models.gemma4 import configuration_gemma4, modeling_gemma4  # noqa: E402
from transformers.models.gpt_oss import modeling_gpt_oss  # noqa: E402
from transformers.models.gptj import modeling_gptj  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
SEQ = 96


def _bound(reference_scale, magnitude, dtype):
    """The reference's float32 angles are off by up to ~position * eps (ours are float64, rounded once); in
    bfloat16 both sides round the result, half an ulp each."""
    position = torch.arange(SEQ, dtype=torch.float32)[:, None]
    bound = 8 * EPS32 * (position + 16) * reference_scale * magnitude
    if dtype == torch.bfloat16:
        bound = bound + torch.finfo(torch.bfloat16).eps * reference_scale * magnitude
    return bound


def _compare(rope, layout, q, k, hf_q, hf_k, scale, dtype, channels=None):
    """Run the module in ``layout`` (q and k given as (b h s d)) and compare with the reference's (b h s d),
    whose channels are ours in the order ``channels`` where given."""
    to = {"b h s d": lambda t: t, "b s h d": lambda t: t.transpose(1, 2)}[layout]
    ours_q, ours_k = rope(to(q), to(k))
    ours_q, ours_k = to(ours_q), to(ours_k)
    if channels is not None:
        ours_q, ours_k = ours_q[..., channels], ours_k[..., channels]
    bound = _bound(scale, max(q.abs().max(), k.abs().max()).float(), dtype)
    for ours, theirs in ((ours_q, hf_q), (ours_k, hf_k)):
        assert ours.dtype == theirs.dtype
        assert ((ours.float() - theirs.float()).abs() <= bound).all(), (ours.float() - theirs.float()).abs().max()


def _gemma3():
    return transformers.Gemma3TextConfig(hidden_size=256, num_attention_heads=4, head_dim=64, num_key_value_heads=1,
                                         max_position_embeddings=512,
                                         rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                                "rope_theta": 10_000.0},
                                                          "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                             "rope_theta": 1_000_000.0}})


def _gemma4():
    return configuration_gemma4.Gemma4TextConfig(hidden_size=256, num_attention_heads=4, head_dim=32,
                                                 global_head_dim=64, num_key_value_heads=1,
                                                 max_position_embeddings=512)


LAYERS = [("gemma3", "sliding_attention"), ("gemma3", "full_attention"), ("gemma4", "sliding_attention"),
          ("gemma4", "full_attention")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["b h s d", "b s h d"])
@pytest.mark.parametrize("model, layer_type", LAYERS)
def test_gemma_layer_types_match_transformers(model, layer_type, layout, dtype):
    config = _gemma3() if model == "gemma3" else _gemma4()
    module = modeling_gemma3 if model == "gemma3" else modeling_gemma4
    rotary_class = modeling_gemma3.Gemma3RotaryEmbedding if model == "gemma3" else module.Gemma4TextRotaryEmbedding
    rotary = rotary_class(config)
    rope = RotaryEmbedding.from_hf_config(config, layer_type=layer_type, layout=layout)
    head_dim = rope.head_dim
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, SEQ, head_dim, generator=gen).to(dtype)
    k = torch.randn(2, 1, SEQ, head_dim, generator=gen).to(dtype)
    cos, sin = rotary(q, torch.arange(SEQ)[None].expand(2, -1), layer_type)
    if model == "gemma3":
        hf_q, hf_k = module.apply_rotary_pos_emb(q, k, cos, sin)
    else:  # Gemma 4 rotates one tensor per call
        hf_q, hf_k = module.apply_rotary_pos_emb(q, cos, sin), module.apply_rotary_pos_emb(k, cos, sin)
    _compare(rope, layout, q, k, hf_q, hf_k, getattr(rotary, f"{layer_type}_attention_scaling"), dtype)


def test_gemma4_full_attention_is_proportional_over_the_whole_head():
    rope = RotaryEmbedding.from_hf_config(_gemma4(), layer_type="full_attention")
    assert rope.head_dim == 64 and rope.rotary_dim == 64 and rope.scaling["rope_type"] == "proportional"
    x = torch.randn(1, 1, 8, 64)
    y = rope(x)
    # 0.25 of the 32 pairs rotate: channels 0..7 and 32..39; the others are the identity
    still = [c for c in range(64) if c % 32 >= 8]
    assert torch.equal(y[..., still], x[..., still]) and not torch.equal(y[..., :8], x[..., :8])


def test_a_per_layer_config_without_layer_type_lists_the_types():
    with pytest.raises(FlexRopeError, match=r"per layer type \(sliding_attention, full_attention\) and no "
                                            r"layer_type was passed: pass layer_type= one of 'sliding_attention', "
                                            r"'full_attention'"):
        RotaryEmbedding.from_hf_config(_gemma3())
    with pytest.raises(FlexRopeError, match="layer_type='local'"):
        RotaryEmbedding.from_hf_config(_gemma3(), layer_type="local")
    with pytest.raises(FlexRopeError, match="drop layer_type"):
        RotaryEmbedding.from_hf_config({"head_dim": 64, "max_position_embeddings": 64}, layer_type="full_attention")


def _deepseek():
    return transformers.DeepseekV3Config(
        hidden_size=256, num_attention_heads=4, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        kv_lora_rank=32, q_lora_rank=64, max_position_embeddings=512,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["b h s d", "b s h d"])
def test_deepseek_v3_rotary_slice_matches_transformers(layout, dtype):
    config = _deepseek()
    rotary = modeling_deepseek_v3.DeepseekV3RotaryEmbedding(config)
    rope = RotaryEmbedding.from_hf_config(config, layout=layout)
    assert rope.head_dim == 16 and rope.interleaved
    gen = torch.Generator().manual_seed(2)
    q_full = torch.randn(2, 4, SEQ, 48, generator=gen).to(dtype)  # (b h s d): 32 nope channels, then 16 rope
    k_rope = torch.randn(2, 1, SEQ, 16, generator=gen).to(dtype)  # one key shared by every head
    q_rot = q_full[..., 32:]  # a strided slice of the full q: no copy
    cos, sin = rotary(q_rot, torch.arange(SEQ)[None].expand(2, -1))
    hf_q, hf_k = modeling_deepseek_v3.apply_rotary_pos_emb_interleave(q_rot, k_rope, cos, sin)
    # transformers returns the rotated pairs de-interleaved (every pair's first channel, then every second);
    # flexrope leaves each channel where it was. q and k share the order, so their scores are the same.
    _compare(rope, layout, q_rot, k_rope, hf_q, hf_k, rotary.attention_scaling, dtype,
             channels=list(range(0, 16, 2)) + list(range(1, 16, 2)))
    ours_q, ours_k = RotaryEmbedding.from_hf_config(config)(q_rot.float(), k_rope.float())  # (b h s d)
    torch.testing.assert_close(ours_q @ ours_k.transpose(-1, -2), hf_q.float() @ hf_k.float().transpose(-1, -2),
                               atol=1e-3 if dtype == torch.float32 else 0.15, rtol=0)


def test_deepseek_v3_softmax_scale_is_the_attention_scaling():
    config = _deepseek()
    attention = modeling_deepseek_v3.DeepseekV3Attention(config, layer_idx=0)
    rope = RotaryEmbedding.from_hf_config(config)
    assert rope.softmax_scale == pytest.approx(attention.scaling, rel=1e-12)
    assert rope.softmax_scale != pytest.approx(48 ** -0.5)  # mscale_all_dim moves it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["b h s d", "b s h d"])
def test_gpt_oss_yarn_without_truncation_matches_transformers(layout, dtype):
    config = transformers.GptOssConfig(hidden_size=256, num_attention_heads=4, head_dim=64, num_key_value_heads=1,
                                       max_position_embeddings=2048, num_hidden_layers=2,
                                       rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                        "beta_slow": 1.0, "truncate": False,
                                                        "original_max_position_embeddings": 64,
                                                        "rope_theta": 150_000.0})
    rotary = modeling_gpt_oss.GptOssRotaryEmbedding(config)
    rope = RotaryEmbedding.from_hf_config(config, layout=layout)
    assert rope.scaling["truncate"] is False
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, SEQ, 64, generator=gen).to(dtype)
    k = torch.randn(1, 1, SEQ, 64, generator=gen).to(dtype)
    cos, sin = rotary(q, torch.arange(SEQ)[None])
    hf_q, hf_k = modeling_gpt_oss.apply_rotary_pos_emb(q, k, cos, sin)
    _compare(rope, layout, q, k, hf_q, hf_k, rotary.attention_scaling, dtype)


GPTJ = dict(n_embd=256, n_head=4, rotary_dim=16, n_positions=128)


@pytest.mark.parametrize("as_dict", [False, True])
def test_gptj_config_object_and_dict_match_transformers(as_dict):
    config = transformers.GPTJConfig(**GPTJ)
    source = {"model_type": "gptj", **GPTJ} if as_dict else config
    rope = RotaryEmbedding.from_hf_config(source, layout="b s h d")
    assert rope.interleaved and rope.rotary_dim == 16 and rope.head_dim == 64
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, SEQ, 4, 64, generator=gen)  # (b s h d), as GPT-J's attention holds it
    table = modeling_gptj.create_sinusoidal_positions(128, 16)
    sincos = table[torch.arange(SEQ)][None]
    sin, cos = torch.split(sincos, 8, dim=-1)
    expected = torch.cat([modeling_gptj.apply_rotary_pos_emb(x[..., :16], sin, cos), x[..., 16:]], dim=-1)
    bound = _bound(1.0, x.abs().max(), torch.float32)[None, :, :, None]
    assert ((rope(x) - expected).abs() <= bound).all()


@pytest.mark.parametrize("key, value, match", [
    ("rope_theta", 0, "rope_theta=0: expected a number > 0"),
    ("rope_theta", -5.0, "rope_theta=-5.0: expected a number > 0"),
    ("partial_rotary_factor", 0.0, r"partial_rotary_factor=0.0: expected a number > 0 and at most 1.0"),
    ("partial_rotary_factor", 1.5, r"partial_rotary_factor=1.5: expected a number > 0 and at most 1.0"),
])
def test_falsy_and_out_of_range_values_are_errors_not_defaults(key, value, match):
    with pytest.raises(FlexRopeError, match=match):
        RotaryEmbedding.from_hf_config({"head_dim": 64, "max_position_embeddings": 64, key: value})


def test_qwen3_matches_transformers():
    from transformers.models.qwen3 import modeling_qwen3

    config = transformers.Qwen3Config(hidden_size=256, num_attention_heads=4, head_dim=64, num_key_value_heads=1,
                                      max_position_embeddings=512, rope_theta=1_000_000.0)
    rotary = modeling_qwen3.Qwen3RotaryEmbedding(config)
    rope = RotaryEmbedding.from_hf_config(config)
    gen = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 4, SEQ, 64, generator=gen), torch.randn(1, 1, SEQ, 64, generator=gen)
    cos, sin = rotary(q, torch.arange(SEQ)[None])
    hf_q, hf_k = modeling_qwen3.apply_rotary_pos_emb(q, k, cos, sin)
    _compare(rope, "b h s d", q, k, hf_q, hf_k, rotary.attention_scaling, torch.float32)


def test_an_unknown_model_type_is_refused_with_how_to_build_it():
    config = {"model_type": "not_a_family", "head_dim": 64, "max_position_embeddings": 64}
    with pytest.raises(FlexRopeError, match=r"model_type 'not_a_family' is not in flexrope's table of families.*"
                                            r"RotaryEmbedding\(head_dim=\.\.\., theta_base=\.\.\., interleaved="):
        RotaryEmbedding.from_hf_config(config)
    del config["model_type"]  # a plain dict without model_type: the generic half-split reading
    rope = RotaryEmbedding.from_hf_config(config)
    assert (rope.head_dim, rope.rotary_dim, rope.interleaved) == (64, 64, False)


def _same_module(a, b):
    assert a.extra_repr() == b.extra_repr() and a.softmax_scale == b.softmax_scale
    assert torch.equal(a.cos, b.cos) and torch.equal(a.sin, b.sin)


TOP_LEVEL = [("Gemma3Config", "full_attention"), ("Llama4Config", None), ("MllamaConfig", None),
             ("AriaConfig", None), ("Mistral3Config", None), ("LlavaConfig", None)]


@pytest.mark.parametrize("name, layer_type", TOP_LEVEL)
def test_a_composite_config_is_read_through_its_text_config(name, layer_type):
    config = getattr(transformers, name)()
    text = config.get_text_config(decoder=True)
    assert text is not config
    expected = RotaryEmbedding.from_hf_config(text, layer_type=layer_type, context_length=64)
    for source in (config, config.to_dict()):  # the object AutoConfig returns, and its config.json
        _same_module(RotaryEmbedding.from_hf_config(source, layer_type=layer_type, context_length=64), expected)


def test_a_multi_axis_family_is_refused_top_level_and_text_alike():
    config = transformers.Qwen2VLConfig()
    for source in (config, config.text_config, config.to_dict()):
        with pytest.raises(FlexRopeError, match=r"model_type 'qwen2_vl_text' rotates by multi-axis positions "
                                                r"\(M-RoPE\): use MultiAxisRotaryEmbedding.from_hf_config"):
            RotaryEmbedding.from_hf_config(source)


def test_a_vision_only_config_names_the_config_to_pass():
    with pytest.raises(FlexRopeError, match=r"model_type 'pixtral' is a vision config without a text model: "
                                            r"RotaryEmbedding reads the config of a text model \(pass the composite "
                                            r"model's text_config\)"):
        RotaryEmbedding.from_hf_config(transformers.PixtralVisionConfig())


def _uses_rope(name, config, layer_idx):
    """Whether transformers' own attention of that layer rotates."""
    if name == "smollm3":
        from transformers.models.smollm3.modeling_smollm3 import SmolLM3Attention
        return SmolLM3Attention(config, layer_idx).use_rope
    if name == "llama4":
        from transformers.models.llama4.modeling_llama4 import Llama4TextAttention
        return Llama4TextAttention(config, layer_idx).use_rope
    from transformers.models.cohere2.modeling_cohere2 import Cohere2Attention
    return Cohere2Attention(config, layer_idx).sliding_window is not None  # it rotates where it slides


LAYERED = {
    "smollm3": lambda: transformers.SmolLM3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                                  intermediate_size=64, num_hidden_layers=8, no_rope_layer_interval=3),
    "llama4": lambda: transformers.Llama4TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                                    head_dim=16, intermediate_size=64, intermediate_size_mlp=64,
                                                    num_hidden_layers=8),
    "cohere2": lambda: transformers.Cohere2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                                  intermediate_size=64, num_hidden_layers=8),
}


@pytest.mark.parametrize("name", sorted(LAYERED))
def test_layer_idx_says_which_layers_rotate_as_the_attention_does(name):
    config = LAYERED[name]()
    rotating = [i for i in range(8) if RotaryEmbedding.from_hf_config(config, layer_idx=i) is not None]
    expected = [i for i in range(8) if _uses_rope(name, config, i)]
    assert rotating == expected and 0 < len(expected) < 8
    rope = RotaryEmbedding.from_hf_config(config, layer_idx=expected[0])
    _same_module(rope, RotaryEmbedding.from_hf_config(config))
    with pytest.raises(FlexRopeError, match=r"layer_idx=8: expected an int >= 0 < num_hidden_layers=8"):
        RotaryEmbedding.from_hf_config(config, layer_idx=8)


def test_layer_idx_picks_the_layer_type_of_a_per_type_config():
    config = _gemma3()
    config.layer_types = ["sliding_attention", "full_attention"] * 3
    config.num_hidden_layers = 6
    for i, kind in enumerate(config.layer_types):
        _same_module(RotaryEmbedding.from_hf_config(config, layer_idx=i), RotaryEmbedding.from_hf_config(
            config, layer_type=kind))
    with pytest.raises(FlexRopeError, match=r"layer_type='sliding_attention' was passed but layer 1 is of type "
                                            r"'full_attention'"):
        RotaryEmbedding.from_hf_config(config, layer_idx=1, layer_type="sliding_attention")


def test_codegen_dict_is_interleaved_over_its_rotary_dim():
    from transformers.models.codegen import modeling_codegen

    config = {"model_type": "codegen", "n_embd": 256, "n_head": 4, "rotary_dim": 16, "n_positions": 128}
    rope = RotaryEmbedding.from_hf_config(config, layout="b s h d")
    assert rope.interleaved and rope.rotary_dim == 16
    x = torch.randn(2, SEQ, 4, 64, generator=torch.Generator().manual_seed(7))
    sincos = modeling_codegen.create_sinusoidal_positions(128, 16)[torch.arange(SEQ)][None]
    sin, cos = torch.split(sincos, 8, dim=-1)
    expected = torch.cat([modeling_codegen.apply_rotary_pos_emb(x[..., :16], sin, cos), x[..., 16:]], dim=-1)
    torch.testing.assert_close(rope(x), expected, atol=2e-5, rtol=0)


def test_phi3_dict_with_original_length_outside_the_scaling_dict():
    from transformers.models.phi3 import modeling_phi3

    short, long = [1.0 + 0.1 * i for i in range(8)], [2.0 + 0.5 * i for i in range(8)]
    source = {"model_type": "phi3", "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 256,
              "original_max_position_embeddings": 32, "rope_theta": 10_000.0,
              "rope_scaling": {"type": "longrope", "short_factor": short, "long_factor": long}}
    rope = RotaryEmbedding.from_hf_config(source)
    assert rope.scaling["original_max_position_embeddings"] == 32
    config = transformers.Phi3Config(**{k: v for k, v in source.items() if k != "model_type"})
    rotary = modeling_phi3.Phi3RotaryEmbedding(config)
    gen = torch.Generator().manual_seed(8)
    q, k = torch.randn(1, 4, 48, 16, generator=gen), torch.randn(1, 1, 48, 16, generator=gen)  # 48 > 32: long
    cos, sin = rotary(q, torch.arange(48)[None])
    hf_q, hf_k = modeling_phi3.apply_rotary_pos_emb(q, k, cos, sin)
    ours_q, ours_k = rope(q, k)
    torch.testing.assert_close(ours_q, hf_q, atol=2e-5, rtol=0)
    torch.testing.assert_close(ours_k, hf_k, atol=2e-5, rtol=0)


def test_ministral3_yarn_dict_is_read_and_its_query_scale_left_to_the_attention():
    config = transformers.Ministral3Config()
    assert "llama_4_scaling_beta" in config.rope_parameters and "max_position_embeddings" in config.rope_parameters
    rope = RotaryEmbedding.from_hf_config(config, context_length=64)
    assert rope.scaling["rope_type"] == "yarn" and "llama_4_scaling_beta" not in rope.scaling
    # a config.json whose only max_position_embeddings is the one inside the YaRN dict (a short one: the tables)
    source = {"model_type": "ministral3", "head_dim": 128,
              "rope_parameters": {**config.rope_parameters, "max_position_embeddings": 1024}}
    assert RotaryEmbedding.from_hf_config(source).context_length == 1024


@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa", "longcat_flash", "mistral_large4_text"])
def test_latent_attention_without_the_flag_interleaves(model_type):
    rope = RotaryEmbedding.from_hf_config(transformers.AutoConfig.for_model(model_type), context_length=64)
    assert rope.interleaved and rope.rotary_dim == rope.head_dim


def test_deepseek_v4_rotates_its_rope_slice_once_and_scales_by_the_whole_head():
    config = transformers.DeepseekV4Config()
    rope = RotaryEmbedding.from_hf_config(config, layer_type="main", context_length=64)
    # qk_rope_head_dim (64) is already the rotated width: partial_rotary_factor (0.125) is not applied again
    assert (rope.head_dim, rope.rotary_dim, rope.interleaved) == (64, 64, True)
    assert rope.softmax_scale == config.head_dim ** -0.5  # DeepseekV4Attention.scaling: head_dim ** -0.5


def test_a_context_of_gigabytes_is_refused_unless_asked_for(monkeypatch):
    """Llama 4 Scout's config.json says max_position_embeddings=10,485,760: 10 GiB of tables by default. Refused,
    naming the size and context_length=; given context_length, the module is built for that length."""
    config = {"model_type": "llama4_text", "head_dim": 128, "hidden_size": 5120, "num_attention_heads": 40,
              "rope_theta": 500000.0, "max_position_embeddings": 10485760, "rope_scaling": None}
    with pytest.raises(FlexRopeError, match=r"10,485,760 would make tables of 10\.0 GiB.*context_length="):
        RotaryEmbedding.from_hf_config(config)
    assert RotaryEmbedding.from_hf_config(config, context_length=4096).cos.shape[0] == 4096
    monkeypatch.setattr(_hf_config, "TABLES_LIMIT_BYTES", 2 * 4096 * 128 * 4)
    assert RotaryEmbedding.from_hf_config({**config, "max_position_embeddings": 4096}).context_length == 4096
    with pytest.raises(FlexRopeError, match="4,097"):
        RotaryEmbedding.from_hf_config({**config, "max_position_embeddings": 4097})


def test_multi_axis_context_of_gigabytes_is_refused_unless_asked_for():
    """The multi-axis reader has the same default and guard: Qwen2-VL's tables take 512 bytes a position (64 pairs,
    cos and sin, float32), so 10,485,760 positions would be 5 GiB; context_length= builds the length asked for, and
    a max_position_embeddings that is not a positive int is named."""
    config = transformers.Qwen2VLConfig().to_dict()
    config["text_config"]["max_position_embeddings"] = 10485760
    with pytest.raises(FlexRopeError, match=r"MultiAxisRotaryEmbedding.from_hf_config: .*10,485,760 would make "
                                            r"tables of 5\.0 GiB.*context_length="):
        MultiAxisRotaryEmbedding.from_hf_config(config)
    rope = MultiAxisRotaryEmbedding.from_hf_config(config, context_length=1024)
    assert set(rope.context_length.values()) == {1024}
    config["text_config"]["max_position_embeddings"] = "4096"
    with pytest.raises(FlexRopeError, match="max_position_embeddings='4096': expected a positive int"):
        MultiAxisRotaryEmbedding.from_hf_config(config)
