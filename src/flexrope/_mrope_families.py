"""The multi-axis (M-RoPE) text rotary embeddings of Hugging Face model families, as data.

Each family's text model turns every channel pair with one of several position axes (position_ids of shape
(A, b, s)); the families differ in which pair goes with which axis, how channels pair up, whether
``partial_rotary_factor`` is read and which ``rope_type`` is built. One ``_Scheme`` per family states what its
transformers code does; :func:`multiaxis_settings` reads a config through it into the arguments of
``MultiAxisRotaryEmbedding``. transformers is never imported.

Assignments (pair j of P, sections s):

- ``sections`` (Qwen2-VL): contiguous blocks of s_0, s_1, s_2 pairs, to t, y, x (s must sum to P).
- ``qwen3`` (Qwen3-VL's interleaved M-RoPE): pair j to y where j % 3 == 1 and j < 3 s_1, to x where
  j % 3 == 2 and j < 3 s_2, else to t (s_0 is not read: t takes every other pair).
- ``ernie`` (ERNIE-4.5-VL): the first 2 s_0 pairs alternate y, x (s_0 == s_1), the last s_2 go to t.
- ``alternate`` (NeoMME): pair j to the first axis where j is even, the second where odd.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._errors import FlexRopeError
from ._hf_config import config_value, text_config
from ._scaling import frequencies, parse_scaling

_BUILT_SCALING = ("linear", "llama3", "yarn")  # each a fixed set of frequencies (and a factor on cos and sin)
_REASONS = {
    "dynamic": "transformers recomputes the frequencies from the largest position of each call",
    "longrope": "transformers switches the frequencies on the largest position of each call",
}


@dataclass(frozen=True)
class _Scheme:
    name: str  # as the README and errors call the family
    assignment: str  # sections, qwen3, ernie, alternate
    sections: tuple[int, ...] | None  # the family's default mrope_section
    interleaved: bool = False  # pairs (2i, 2i+1) instead of (i, i + r/2)
    reads_partial: bool = False  # whether the family's frequencies read partial_rotary_factor
    scaling: tuple[str, ...] = _BUILT_SCALING  # rope types flexrope builds (transformers builds these too)
    axes: tuple[str, ...] = ("t", "y", "x")
    refused: str | None = None  # why flexrope does not build this family


_QWEN2 = _Scheme("Qwen2-VL", "sections", (16, 24, 24))
_QWEN3 = _Scheme("Qwen3-VL", "qwen3", (24, 20, 20))
_QWEN3_5 = _Scheme("Qwen3.5", "qwen3", (11, 11, 10), reads_partial=True)
_GLM4V = _Scheme("GLM-4V", "sections", (8, 12, 12), interleaved=True, reads_partial=True)
_GLM4V_MOE = _Scheme("GLM-4.5V", "sections", (8, 12, 12), reads_partial=True)

# model_type -> scheme: the top-level type of a composite config and its text model's type, both (a
# config.json may keep the text settings at its top level).
FAMILIES: dict[str, _Scheme] = {
    **dict.fromkeys(("qwen2_vl", "qwen2_vl_text"), _QWEN2),
    **dict.fromkeys(("qwen2_5_vl", "qwen2_5_vl_text"), _Scheme("Qwen2.5-VL", "sections", (16, 24, 24))),
    **dict.fromkeys(("qwen2_5_omni", "qwen2_5_omni_thinker", "qwen2_5_omni_text", "qwen2_5_omni_talker"),
                    _Scheme("Qwen2.5-Omni", "sections", (16, 24, 24))),
    **dict.fromkeys(("paddleocr_vl", "paddleocr_vl_text"), _Scheme("PaddleOCR-VL", "sections", (16, 24, 24))),
    **dict.fromkeys(("qwen3_vl", "qwen3_vl_text"), _QWEN3),
    **dict.fromkeys(("qwen3_vl_moe", "qwen3_vl_moe_text"), _Scheme("Qwen3-VL-MoE", "qwen3", (24, 20, 20))),
    **dict.fromkeys(("qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text",
                     "qwen3_omni_moe_talker_text"), _Scheme("Qwen3-Omni", "qwen3", (24, 20, 20))),
    **dict.fromkeys(("cosmos3_edge", "cosmos3_edge_text", "cosmos3_omni"),
                    _Scheme("Cosmos-3", "qwen3", (24, 20, 20), scaling=())),
    **dict.fromkeys(("cohere_compass", "cohere_compass_text"), _Scheme("Cohere-Compass", "qwen3", (24, 20, 20))),
    # HY-V4-VL rotates interleaved pairs and returns them de-interleaved (as DeepSeek-V3): the same scores
    **dict.fromkeys(("hy_v4_vl", "hy_v4_vl_text"), _Scheme("HY-V4-VL", "qwen3", (24, 20, 20), interleaved=True)),
    **dict.fromkeys(("qwen3_5", "qwen3_5_text", "minicpmv4_7"), _QWEN3_5),
    **dict.fromkeys(("qwen3_5_moe", "qwen3_5_moe_text"), _Scheme("Qwen3.5-MoE", "qwen3", (11, 11, 10),
                                                                  reads_partial=True)),
    **dict.fromkeys(("qwen4_exp", "qwen4_exp_text"), _Scheme("Qwen4-Exp", "qwen3", (11, 11, 10),
                                                              reads_partial=True)),
    **dict.fromkeys(("glm4v", "glm4v_text", "glm46v"), _GLM4V),
    **dict.fromkeys(("glm_ocr", "glm_ocr_text"), _Scheme("GLM-OCR", "sections", (8, 12, 12), interleaved=True,
                                                          reads_partial=True)),
    **dict.fromkeys(("glm4v_moe", "glm4v_moe_text"), _GLM4V_MOE),
    **dict.fromkeys(("glm_image", "glm_image_text"), _Scheme("GLM-Image", "sections", (8, 12, 12),
                                                              reads_partial=True)),
    **dict.fromkeys(("ernie4_5_vl_moe", "ernie4_5_vl_moe_text"),
                    _Scheme("ERNIE-4.5-VL", "ernie", (22, 22, 20), interleaved=True, scaling=())),
    "neomme": _Scheme("NeoMME", "alternate", None, reads_partial=True, axes=("y", "x")),
    **dict.fromkeys(("hunyuan_vl", "hunyuan_vl_text"), _Scheme(
        "HunYuan-VL", "sections", None, refused=(
            "transformers' HunYuanVLRotaryEmbedding splits cos and sin (r channels) into blocks of 2 x each "
            "mrope_section, so a channel and its rotate_half partner take different axes' angles: not a rotation, "
            "and not the original xdrope (which repeats the sections over each half). Build the original with "
            "MultiAxisRotaryEmbedding(head_dim, axes=dict(zip(names, xdrope_section)), assignment='sections')"))),
}

_TOWERS = ("_vision", "_vision_encoder", "_audio_encoder", "_vqmodel", "_code2wav", "_dit", "_bigvgan")


def _assignment(scheme: _Scheme, sections: list[int], pairs: int) -> list[str]:
    """The axis name of every pair, as the family's transformers code assigns them."""
    names = scheme.axes
    if scheme.assignment == "alternate":
        return [names[j % 2] for j in range(pairs)]
    if len(sections) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sections):
        raise FlexRopeError(f"mrope_section={sections!r}: expected three counts of channel pairs (t, h, w)")
    if scheme.assignment == "sections":
        if sum(sections) != pairs:
            raise FlexRopeError(f"mrope_section={sections!r} sums to {sum(sections)} pairs, but the rotary "
                                f"dim has {pairs}: the sections must cover every pair")
        return [name for name, n in zip(names, sections) for _ in range(n)]
    if scheme.assignment == "qwen3":
        return [names[1] if j % 3 == 1 and j < 3 * sections[1] else
                names[2] if j % 3 == 2 and j < 3 * sections[2] else names[0] for j in range(pairs)]
    # ernie: frequencies j < 2 s_0 alternate h, w (transformers reorders them to interleave the two axes)
    if sections[0] != sections[1] or sum(sections) != pairs:
        raise FlexRopeError(f"mrope_section={sections!r}: ERNIE-4.5-VL needs equal h and w sections and a sum of "
                            f"{pairs} pairs")
    return [names[1 + j % 2] if j < 2 * sections[0] else names[0] for j in range(pairs)]


def _parameters(config, layer_type: str | None) -> dict:
    parameters = config_value(config, "rope_parameters")
    if parameters is None:
        parameters = config_value(config, "rope_scaling")
    parameters = dict(parameters or {})
    per_type = sorted(name for name, value in parameters.items() if isinstance(value, dict) or (
        value is None and name in (config_value(config, "layer_types") or ())))
    if per_type:
        if layer_type not in parameters:
            given = "no layer_type" if layer_type is None else f"layer_type={layer_type!r}"
            raise FlexRopeError(f"rope_parameters is given per layer type ({', '.join(per_type)}) and {given} was "
                                f"passed: pass layer_type= one of {', '.join(repr(t) for t in per_type)}")
        if parameters[layer_type] is None:
            raise FlexRopeError(f"layers of type {layer_type!r} have no rotary embedding (rope_parameters is None)")
        return dict(parameters[layer_type])
    if layer_type is not None:
        raise FlexRopeError(f"layer_type={layer_type!r} was passed but the config has one rope_parameters for every "
                            f"layer: drop layer_type")
    return parameters


def _scheme(config) -> _Scheme:
    model_type = config_value(config, "model_type")
    if not model_type:  # a plain dict without a model type: the Qwen-VL schemes, chosen by mrope_interleaved
        parameters = dict(config_value(config, "rope_parameters") or config_value(config, "rope_scaling") or {})
        return _QWEN3 if parameters.get("mrope_interleaved") else _QWEN2
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if str(model_type).endswith(_TOWERS):
        raise FlexRopeError(f"model_type {model_type!r} is the config of a vision or audio tower, not of a text "
                            f"model: pass the model's top-level config or its text_config (the vision towers' "
                            f"rotary embeddings are in flexrope.presets)")
    raise FlexRopeError(
        f"model_type {model_type!r} is not a multi-axis (M-RoPE) family flexrope knows ({len(set(FAMILIES))} "
        f"families: {', '.join(sorted(k for k in FAMILIES if not k.endswith('_text')))}). For a 1-D rotary "
        f"embedding use RotaryEmbedding.from_hf_config; otherwise build MultiAxisRotaryEmbedding(head_dim, "
        f"axes={{'t': ..., 'y': ..., 'x': ...}}, assignment='sections' | 'round_robin' | [axis per pair], "
        f"interleaved=...) from what the model's code does")


def multiaxis_settings(config, layer_type: str | None = None) -> dict:
    """The keyword arguments of ``MultiAxisRotaryEmbedding`` (all but ``layout``) for a config's text model."""
    config = text_config(config)
    scheme = _scheme(config)
    if scheme.refused:
        raise FlexRopeError(f"{scheme.name} is refused: {scheme.refused}")
    parameters = _parameters(config, layer_type)
    for key in ("mrope_section", "mrope_interleaved"):
        if key in parameters or config_value(config, key) is None:
            continue
        parameters[key] = config_value(config, key)  # older configs keep them beside rope_scaling
    interleaved_flag = parameters.pop("mrope_interleaved", None)
    if interleaved_flag is not None and scheme.assignment in ("sections", "qwen3") and (
        bool(interleaved_flag) != (scheme.assignment == "qwen3")
    ):
        raise FlexRopeError(f"mrope_interleaved={interleaved_flag!r}, but {scheme.name}'s text model assigns pairs "
                            f"{'round robin' if scheme.assignment == 'qwen3' else 'in sections'} whatever the flag "
                            f"says: the config contradicts the model's code")
    sections = list(parameters.pop("mrope_section", None) or scheme.sections or ())
    head_dim = config_value(config, "qk_rope_head_dim")  # multi-head latent attention: the rotary slice
    head_dim = config_value(config, "head_dim") if head_dim is None else head_dim
    if head_dim is None:
        hidden, heads = config_value(config, "hidden_size"), config_value(config, "num_attention_heads")
        if hidden is None or heads is None:
            raise FlexRopeError("the config has neither 'head_dim' nor 'hidden_size' and 'num_attention_heads'")
        head_dim = hidden // heads
    theta = parameters.pop("rope_theta", None)
    theta = config_value(config, "rope_theta") if theta is None else theta
    theta = 10_000.0 if theta is None else theta
    partial = parameters.pop("partial_rotary_factor", None)
    partial = config_value(config, "partial_rotary_factor") if partial is None else partial
    partial = 1.0 if partial is None else partial
    if partial != 1.0 and not scheme.reads_partial:
        raise FlexRopeError(f"partial_rotary_factor={partial!r}, but {scheme.name}'s text rotary embedding rotates "
                            f"the whole head whatever it says: the config contradicts the model's code")
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise FlexRopeError(f"partial_rotary_factor={partial!r}: expected a number in (0, 1]")
    rotary_dim = int(head_dim * partial)
    pairs = rotary_dim // 2
    assignment = _assignment(scheme, sections, pairs)
    axes = {name: assignment.count(name) for name in scheme.axes}
    max_positions = config_value(config, "max_position_embeddings")
    max_positions = 4096 if max_positions is None else max_positions
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type == "mrope":  # Qwen2-VL checkpoints' name for the default M-RoPE (transformers reads it so)
        rope_type = "default"
    inv_freq, attention_factor = None, 1.0
    if rope_type != "default":
        if rope_type not in scheme.scaling:
            why = _REASONS.get(rope_type, f"{scheme.name} builds {', '.join(scheme.scaling) or 'only default'}")
            raise FlexRopeError(f"rope_type {rope_type!r} with {scheme.name}'s M-RoPE is not built: {why}")
        inv_freq, attention_factor = _scaled(parameters, rope_type, rotary_dim, head_dim, theta, max_positions)
    return {"head_dim": head_dim, "axes": axes, "assignment": assignment, "frequencies": "shared",
            "inv_freq": inv_freq, "theta_base": theta, "interleaved": scheme.interleaved,
            "context_length": max_positions, "attention_factor": attention_factor}


def _scaled(parameters: dict, rope_type: str, rotary_dim: int, head_dim: int, theta: float, max_positions: int):
    """The frequencies and the factor on cos and sin of a length-independent recipe, as transformers'
    ROPE_INIT_FUNCTIONS compute them from the config."""
    recipe = dict(parameters)
    if rope_type in ("yarn", "llama3"):
        recipe.setdefault("original_max_position_embeddings", max_positions)
        if recipe.get("factor") is None and rope_type == "yarn":
            recipe["factor"] = max_positions / recipe["original_max_position_embeddings"]
    checked = parse_scaling(recipe, rotary_dim=rotary_dim, head_dim=head_dim, theta_base=theta)
    inv, attention = frequencies(checked, rotary_dim, theta, max_positions)
    return inv, float(attention)
