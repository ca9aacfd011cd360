"""MultiAxisRotaryEmbedding.from_hf_config against every multi-axis (M-RoPE) text rotary embedding of the
installed transformers: each family's tiny config, its own rotary module and apply function, and position ids
from its own get_rope_index (text, an image, text) where the family has one."""

import importlib
import types

import pytest
import torch

from flexrope import FlexRopeError, MultiAxisRotaryEmbedding
from flexrope._mrope_families import FAMILIES

transformers = pytest.importorskip("transformers")

EPS32 = torch.finfo(torch.float32).eps
EPS16 = torch.finfo(torch.bfloat16).eps


# family -> (its text config class, text rotary class, apply function, the model class that has get_rope_index
# or None, the top-level config class or None, text config arguments, layer_type, output de-interleaved)
def _spec(text_config, rotary, model=None, top=None, apply="apply_rotary_pos_emb", layer_type=None,
          deinterleaved=False, **kwargs):
    return dict(text_config=text_config, rotary=rotary, model=model, top=top, apply=apply, layer_type=layer_type,
                deinterleaved=deinterleaved, kwargs=kwargs)


_HEAD128 = dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1)
SPECS = {
    "qwen2_vl": _spec("Qwen2VLTextConfig", "Qwen2VLRotaryEmbedding", "Qwen2VLModel", "Qwen2VLConfig", **_HEAD128),
    "qwen2_5_vl": _spec("Qwen2_5_VLTextConfig", "Qwen2_5_VLRotaryEmbedding", "Qwen2_5_VLModel", "Qwen2_5_VLConfig",
                        **_HEAD128),
    "qwen2_5_omni": _spec("Qwen2_5OmniTextConfig", "Qwen2_5OmniRotaryEmbedding", **_HEAD128),
    "paddleocr_vl": _spec("PaddleOCRTextConfig", "PaddleOCRRotaryEmbedding", "PaddleOCRVLModel", "PaddleOCRVLConfig",
                          head_dim=128, **_HEAD128),
    "qwen3_vl": _spec("Qwen3VLTextConfig", "Qwen3VLTextRotaryEmbedding", "Qwen3VLModel", "Qwen3VLConfig",
                      head_dim=128, **_HEAD128),
    "qwen3_vl_moe": _spec("Qwen3VLMoeTextConfig", "Qwen3VLMoeTextRotaryEmbedding", "Qwen3VLMoeModel",
                          "Qwen3VLMoeConfig", head_dim=128, **_HEAD128),
    "qwen3_omni_moe": _spec("Qwen3OmniMoeTextConfig", "Qwen3OmniMoeThinkerTextRotaryEmbedding", head_dim=128,
                            **_HEAD128),
    "qwen3_5": _spec("Qwen3_5TextConfig", "Qwen3_5TextRotaryEmbedding", "Qwen3_5Model", "Qwen3_5Config",
                     head_dim=256, **_HEAD128),
    "qwen3_5_moe": _spec("Qwen3_5MoeTextConfig", "Qwen3_5MoeTextRotaryEmbedding", "Qwen3_5MoeModel",
                         "Qwen3_5MoeConfig", head_dim=256, **_HEAD128),
    "qwen4_exp": _spec("Qwen4ExpTextConfig", "Qwen4ExpTextRotaryEmbedding", "Qwen4ExpModel", "Qwen4ExpConfig",
                       head_dim=128, **_HEAD128),
    "cosmos3_edge": _spec("Cosmos3EdgeTextConfig", "Cosmos3EdgeTextRotaryEmbedding", "Cosmos3EdgeModel",
                          "Cosmos3EdgeConfig", head_dim=128, **_HEAD128),
    "cohere_compass": _spec("CohereCompassTextConfig", "CohereCompassRotaryEmbedding", "CohereCompassModel",
                            "CohereCompassConfig", layer_type="full_attention", head_dim=128, **_HEAD128),
    # HY-V4-VL's get_rope_index adds a column of row-break tokens to the image: ids by hand
    "hy_v4_vl": _spec("HYV4VLTextConfig", "HYV4VLRotaryEmbedding",
                      apply="apply_rotary_pos_emb_interleave", deinterleaved=True, qk_rope_head_dim=128, **_HEAD128),
    "glm4v": _spec("Glm4vTextConfig", "Glm4vTextRotaryEmbedding", "Glm4vModel", "Glm4vConfig", **_HEAD128),
    "glm_ocr": _spec("GlmOcrTextConfig", "GlmOcrTextRotaryEmbedding", "GlmOcrModel", "GlmOcrConfig",
                     hidden_size=128, num_attention_heads=2, num_key_value_heads=1),
    "glm4v_moe": _spec("Glm4vMoeTextConfig", "Glm4vMoeTextRotaryEmbedding", "Glm4vMoeModel", "Glm4vMoeConfig",
                       **_HEAD128),
    "glm_image": _spec("GlmImageTextConfig", "GlmImageTextRotaryEmbedding", hidden_size=128, num_attention_heads=2,
                       num_key_value_heads=1),
    "ernie4_5_vl_moe": _spec("Ernie4_5_VLMoeTextConfig", "Ernie4_5_VLMoeTextRotaryEmbedding", "Ernie4_5_VLMoeModel",
                             "Ernie4_5_VLMoeConfig", **_HEAD128),
    "neomme": _spec("NeoMMEConfig", "NeoMMERotaryEmbedding", layer_type="full_attention", head_dim=64,
                    hidden_size=128, num_attention_heads=2, num_key_value_heads=1),
}
# the partial rotation the family's checkpoints use, where its config's default leaves it out
PARTIAL = {"glm4v": 0.5, "glm4v_moe": 0.5, "glm_image": 1.0, "qwen4_exp": 0.5}
SECTIONS = {"cosmos3_edge": [24, 20, 20], "hy_v4_vl": [24, 20, 20]}  # configs that require mrope_section


def _family(name):
    try:
        return importlib.import_module(f"transformers.models.{name}.modeling_{name}"), importlib.import_module(
            f"transformers.models.{name}.configuration_{name}")
    except ImportError as error:
        pytest.skip(f"transformers {transformers.__version__} has no {name}: {error}")


def _text_config(name, rope_parameters=None, max_positions=512):
    modeling, configuration = _family(name)
    spec = SPECS[name]
    parameters = {"rope_type": "default", "rope_theta": 10_000.0}
    if name in PARTIAL:
        parameters["partial_rotary_factor"] = PARTIAL[name]
    if name == "qwen3_5" or name == "qwen3_5_moe":
        parameters["partial_rotary_factor"] = 0.25
    if name in SECTIONS:
        parameters["mrope_section"] = SECTIONS[name]
    parameters.update(rope_parameters or {})
    if spec["layer_type"] is not None:
        parameters = {spec["layer_type"]: parameters}
    config = getattr(configuration, spec["text_config"])(max_position_embeddings=max_positions,
                                                         rope_parameters=parameters, **spec["kwargs"])
    return modeling, configuration, config


def _their_rotation(modeling, name, config, q, k, position_ids):
    spec = SPECS[name]
    rotary = getattr(modeling, spec["rotary"])(config)
    extra = () if spec["layer_type"] is None else (spec["layer_type"],)
    cos, sin = rotary(q, position_ids, *extra)
    return getattr(modeling, spec["apply"])(q, k, cos, sin), rotary


def _rope_index(modeling, configuration, name, config, batch_ids, grids):
    """(3, b, s) position ids from the family's own get_rope_index: each row text, one image, text."""
    spec = SPECS[name]
    top = getattr(configuration, spec["top"])(text_config=config.to_dict())
    model = getattr(modeling, spec["model"])
    fake = types.SimpleNamespace(config=top)
    for attribute in dir(model):
        if attribute.startswith("get_") and attribute != "get_rope_index" and callable(getattr(model, attribute)):
            setattr(fake, attribute, types.MethodType(getattr(model, attribute), fake))
    merge = top.vision_config.spatial_merge_size
    input_ids, types_ = [], []
    for before, (t, h, w), after in batch_ids:
        image = t * h * w // merge ** 2
        types_.append([0] * before + [1] * image + [0] * after)
        input_ids.append([5] * before + [7] * image + [5] * after)
    position_ids, _ = model.get_rope_index(fake, input_ids=torch.tensor(input_ids),
                                           mm_token_type_ids=torch.tensor(types_, dtype=torch.int32),
                                           image_grid_thw=torch.tensor(grids))
    return position_ids


def _positions(modeling, configuration, name, config):
    """Real position ids where the family has get_rope_index, else the same text, image, text layout by hand."""
    if SPECS[name]["model"] is not None:
        # merge 2: a 1 x 4 x 6 image gives 6 tokens on a 2 x 3 grid; rows with text of other lengths around it
        rows = [(5, (1, 4, 6), 4), (2, (1, 4, 6), 7)]
        return _rope_index(modeling, configuration, name, config, rows, [[1, 4, 6], [1, 4, 6]])
    ids = torch.empty(3, 2, 15, dtype=torch.long)
    for b, before in enumerate((5, 2)):
        text = torch.arange(before)
        y, x = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
        image = torch.stack([torch.zeros(6, dtype=torch.long), y.flatten(), x.flatten()]) + before
        after = torch.arange(15 - before - 6) + before + 3
        ids[:, b] = torch.cat([text.expand(3, -1), image, after.expand(3, -1)], 1)
    return ids if name != "neomme" else ids[1:]


def _check(name, rope, modeling, config, position_ids, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seq = position_ids.shape[-1]
    q = torch.randn(2, 2, seq, rope.head_dim, generator=gen).to(dtype)
    k = torch.randn(2, 1, seq, rope.head_dim, generator=gen).to(dtype)
    (hf_q, hf_k), rotary = _their_rotation(modeling, name, config, q, k, position_ids)
    ours_q, ours_k = rope(q, k, positions=position_ids)
    if SPECS[name]["deinterleaved"]:  # the rotated pairs come back as every pair's first channel, then every second
        order = list(range(0, rope.rotary_dim, 2)) + list(range(1, rope.rotary_dim, 2))
        order += list(range(rope.rotary_dim, rope.head_dim))
        ours_q, ours_k = ours_q[..., order], ours_k[..., order]
    scale = max(q.abs().max(), k.abs().max()).float()
    bound = 2e-5 if dtype == torch.float32 else 4 * EPS16 * scale
    for ours, theirs in ((ours_q, hf_q), (ours_k, hf_k)):
        assert ours.dtype == dtype and theirs.shape == ours.shape
        assert (ours.float() - theirs.float()).abs().max() <= bound
    return rotary


@pytest.mark.parametrize("name", sorted(SPECS))
def test_family_matches_its_transformers_rotary_with_its_own_position_ids(name):
    modeling, configuration, config = _text_config(name)
    rope = MultiAxisRotaryEmbedding.from_hf_config(config, layer_type=SPECS[name]["layer_type"])
    position_ids = _positions(modeling, configuration, name, config)
    assert position_ids.shape[0] == len(rope.axes) and (position_ids[0] != position_ids[-1]).any()
    rotary = _check(name, rope, modeling, config, position_ids, torch.float32)
    if name == "ernie4_5_vl_moe":  # keeps its frequencies in the order of its own recomposition
        return
    # the family's own inverse frequencies, pair by pair (their cos only shows them mixed with the axes)
    inv = rope.inv_freq.float()
    theirs = getattr(rotary, "inv_freq", None)
    if theirs is None:
        theirs = getattr(rotary, f"{SPECS[name]['layer_type']}_inv_freq")
    assert inv.shape == theirs.shape and torch.allclose(inv, theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["qwen2_vl", "glm4v", "ernie4_5_vl_moe"])
def test_family_matches_in_bfloat16(name):
    modeling, configuration, config = _text_config(name)
    rope = MultiAxisRotaryEmbedding.from_hf_config(config)
    _check(name, rope, modeling, config, _positions(modeling, configuration, name, config), torch.bfloat16)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl", "glm4v"])
@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_scaled_mrope_is_built_as_transformers_builds_it(name, scaling):
    modeling, configuration, config = _text_config(name, scaling)
    rope = MultiAxisRotaryEmbedding.from_hf_config(config)
    position_ids = _positions(modeling, configuration, name, config) * 3
    rotary = _check(name, rope, modeling, config, position_ids, torch.float32, seed=1)
    assert torch.allclose(rope.inv_freq.float(), rotary.inv_freq, rtol=1e-6, atol=0)
    assert rope.attention_factor == pytest.approx(rotary.attention_scaling, rel=1e-12)


@pytest.mark.parametrize("rope_type,params", [("dynamic", {"factor": 2.0}),
                                              ("longrope", {"short_factor": [1.0] * 64, "long_factor": [2.0] * 64,
                                                            "original_max_position_embeddings": 128})])
def test_length_dependent_scaling_is_refused_with_the_reason(rope_type, params):
    _, _, config = _text_config("qwen2_vl", {"rope_type": rope_type, **params})
    with pytest.raises(FlexRopeError, match=f"rope_type '{rope_type}' with Qwen2-VL's M-RoPE is not built: "
                                            f"transformers .* each call"):
        MultiAxisRotaryEmbedding.from_hf_config(config)


def _same_module(a, b):
    return (a.axes == b.axes and a.pair_axes == b.pair_axes and a.interleaved == b.interleaved
            and a.rotary_dim == b.rotary_dim and a.attention_factor == b.attention_factor
            and torch.equal(a.inv_freq, b.inv_freq) and a.context_length == b.context_length)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl", "qwen3_5", "glm4v", "glm_ocr", "ernie4_5_vl_moe",
                                  "cosmos3_edge"])
def test_top_level_config_gives_the_module_of_its_text_config(name):
    modeling, configuration, config = _text_config(name, {"rope_theta": 50_000.0})
    top = getattr(configuration, SPECS[name]["top"])(text_config=config.to_dict())
    ours = MultiAxisRotaryEmbedding.from_hf_config(top)
    assert _same_module(ours, MultiAxisRotaryEmbedding.from_hf_config(top.get_text_config()))
    assert _same_module(ours, MultiAxisRotaryEmbedding.from_hf_config(config))
    assert _same_module(ours, MultiAxisRotaryEmbedding.from_hf_config(top.to_dict()))  # a config.json
    with pytest.raises(FlexRopeError, match="is the config of a vision or audio tower.*text_config"):
        MultiAxisRotaryEmbedding.from_hf_config(top.vision_config)


def test_a_checkpoints_config_json_reads_as_transformers_reads_it():
    # Qwen2.5-VL-7B's config.json: text settings at the top level, the legacy rope_scaling {"type": "mrope"}
    _family("qwen2_5_vl")
    config_json = {"model_type": "qwen2_5_vl", "hidden_size": 3584, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "max_position_embeddings": 128000, "rope_theta": 1000000.0,
                   "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                   "vision_config": {"hidden_size": 1280, "out_hidden_size": 3584}}
    ours = MultiAxisRotaryEmbedding.from_hf_config(config_json)
    config = transformers.AutoConfig.for_model(**config_json)
    assert _same_module(ours, MultiAxisRotaryEmbedding.from_hf_config(config))
    assert ours.axes == {"t": 16, "y": 24, "x": 24} and ours.inv_freq[1] == 1e6 ** (-2 / 128)


def test_assignments_are_the_families_own():
    # Qwen3-VL's interleaved M-RoPE: t, y, x in turn for 3 x the y and x sections, then t
    _, _, config = _text_config("qwen3_vl")
    rope = MultiAxisRotaryEmbedding.from_hf_config(config)
    assert rope.pair_axes == [0, 1, 2] * 20 + [0] * 4
    # ERNIE-4.5-VL: h and w alternate over the first 44 pairs, t has the last 20; interleaved pairs
    _, _, config = _text_config("ernie4_5_vl_moe")
    rope = MultiAxisRotaryEmbedding.from_hf_config(config)
    assert rope.axes == {"t": 20, "y": 22, "x": 22} and rope.pair_axes == [1, 2] * 22 + [0] * 20
    assert rope.interleaved
    # GLM-4V: sections over interleaved pairs; GLM-4.5V (MoE): sections over half-split pairs
    assert MultiAxisRotaryEmbedding.from_hf_config(_text_config("glm4v")[2]).interleaved
    assert not MultiAxisRotaryEmbedding.from_hf_config(_text_config("glm4v_moe")[2]).interleaved


def test_every_family_in_the_table_is_tested_or_refused():
    tested = {name for name in SPECS}
    for model_type, scheme in FAMILIES.items():
        base = model_type.removesuffix("_text")
        assert scheme.refused or base in tested or any(FAMILIES[t] == scheme for t in tested if t in FAMILIES), (
            model_type)


@pytest.mark.parametrize("config,message", [
    ({"model_type": "llama", "head_dim": 64}, "model_type 'llama' is not a multi-axis .* RotaryEmbedding"
                                              ".from_hf_config.*MultiAxisRotaryEmbedding\\(head_dim"),
    ({"model_type": "hunyuan_vl_text", "head_dim": 64}, "HunYuan-VL is refused: transformers' "),
    ({"model_type": "qwen2_vl", "head_dim": 128, "rope_parameters": {"mrope_interleaved": True}},
     "mrope_interleaved=True, but Qwen2-VL's text model assigns pairs in sections"),
    ({"model_type": "qwen3_vl", "head_dim": 128, "rope_parameters": {"partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5, but Qwen3-VL's text rotary embedding rotates the whole head"),
    ({"model_type": "qwen2_vl", "head_dim": 64, "rope_parameters": {"mrope_section": [16, 24, 24]}},
     "mrope_section=\\[16, 24, 24\\] sums to 64 pairs, but the rotary dim has 32"),
    ({"model_type": "ernie4_5_vl_moe", "head_dim": 128, "rope_parameters": {"rope_type": "linear", "factor": 2}},
     "rope_type 'linear' with ERNIE-4.5-VL's M-RoPE is not built: ERNIE-4.5-VL builds only default"),
    ({"model_type": "neomme", "head_dim": 64, "rope_parameters": {"full_attention": {"rope_theta": 1e4}}},
     "rope_parameters is given per layer type \\(full_attention\\) and no layer_type was passed"),
])
def test_refusals_name_the_config_and_the_way_out(config, message):
    with pytest.raises(FlexRopeError, match="MultiAxisRotaryEmbedding.from_hf_config: " + message):
        MultiAxisRotaryEmbedding.from_hf_config(config)


def test_a_dict_without_model_type_keeps_the_qwen_reading():
    rope = MultiAxisRotaryEmbedding.from_hf_config({"head_dim": 128, "rope_parameters": {"mrope_interleaved": True}})
    assert rope.pair_axes == [0, 1, 2] * 20 + [0] * 4
    rope = MultiAxisRotaryEmbedding.from_hf_config({"head_dim": 128})
    assert rope.axes == {"t": 16, "y": 24, "x": 24} and rope.pair_axes == [0] * 16 + [1] * 24 + [2] * 24
