"""Reading a Hugging Face model config (object or dict) into RotaryEmbedding settings.

transformers is never imported: a config is read through its attributes or keys alone. A value that is
absent or None falls back to its default; any other value, zero included, is taken as given and checked.
"""

from __future__ import annotations

import math

from ._errors import FlexRopeError
from ._families import Family, family

_DEFAULT_THETA = 10_000.0
# Names under which configs keep the same setting (GPT-J and GPT-2 style configs use the n_* ones).
_ALIASES = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
    # what JetMoe's (kv_channels) and Zamba 2's (attention_head_dim) config objects read as head_dim: a plain
    # config.json has only these keys, and hidden_size / heads is another number there
    "head_dim": ("head_dim", "attention_head_dim", "kv_channels"),
}


def config_value(config, key: str):
    """``config[key]`` or ``config.key`` (or an alias of it), None when absent."""
    for name in _ALIASES.get(key, (key,)):
        if isinstance(config, dict):
            value = config.get(name)
        else:
            try:
                value = getattr(config, name, None)
            except Exception:  # noqa: BLE001 - configs whose value differs per layer refuse a global read
                value = None
        if value is not None:
            return value
    return None


def _layer_config(config, layer_type: str):
    """The config of one layer type, where the config keeps them apart (Gemma 4's per_layer_config)."""
    per_layer = config_value(config, "per_layer_config")
    try:
        return per_layer[layer_type] if per_layer is not None else config
    except (KeyError, IndexError, TypeError, ValueError):
        return config


def _parameters(config, layer_type: str | None) -> dict:
    # transformers >= 5 keeps theta and the recipe in rope_parameters; older configs in rope_theta/rope_scaling
    name, parameters = "rope_parameters", config_value(config, "rope_parameters")
    if parameters is None:
        name, parameters = "rope_scaling", config_value(config, "rope_scaling")
    if parameters is not None and not isinstance(parameters, dict):
        raise FlexRopeError(f"{name}={parameters!r}: expected a dict such as {{'rope_type': 'linear', 'factor': 2.0}}")
    parameters = dict(parameters or {})
    types = [name for name, value in parameters.items() if isinstance(value, dict)]
    if types:
        if layer_type is None or layer_type not in parameters:
            given = "no layer_type" if layer_type is None else f"layer_type={layer_type!r}"
            raise FlexRopeError(
                f"rope_parameters is given per layer type ({', '.join(types)}) and {given} was passed: pass "
                f"layer_type= one of {', '.join(repr(t) for t in types)}"
            )
        return dict(parameters[layer_type] or {})
    if layer_type is not None:
        raise FlexRopeError(f"layer_type={layer_type!r} was passed but the config has one rope_parameters for every "
                            f"layer: drop layer_type")
    return parameters


def _positive(value, name: str, *, at_most: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0 or (
        at_most is not None and value > at_most
    ):
        bound = f" and at most {at_most}" if at_most is not None else ""
        raise FlexRopeError(f"{name}={value!r}: expected a number > 0{bound}")
    return float(value)


_GENERIC = Family()  # a plain dict without model_type: the Llama / GPT-NeoX reading


def _vision_only(config) -> bool:
    """An image tower's config (sizes of images and patches), or a composite one that holds only such a tower."""
    named = "vision" in str(config_value(config, "model_type") or "") or "Vision" in type(config).__name__
    return named or config_value(config, "vision_config") is not None or any(
        config_value(config, key) is not None for key in ("image_size", "patch_size"))


def config_family(config) -> tuple[object, Family]:
    """The text config and its family's entry; a FlexRopeError where flexrope does not know or cannot
    express the family."""
    text = text_config(config)
    model_type = config_value(text, "model_type")
    if model_type is None and isinstance(text, dict):
        return text, _GENERIC
    entry = family(model_type)
    if entry is None:
        if _vision_only(text):
            raise FlexRopeError(
                f"model_type {model_type!r} is a vision config without a text model: RotaryEmbedding reads the "
                f"config of a text model (pass the composite model's text_config); a vision tower's 2-D "
                f"positions are MultiAxisRotaryEmbedding's")
        raise FlexRopeError(
            f"model_type {model_type!r} is not in flexrope's table of families, so how its channels pair and "
            f"which of them rotate is unknown: build the module from its attention code, e.g. "
            f"RotaryEmbedding(head_dim=..., theta_base=..., interleaved=False, rotary_dim=...) "
            f"(interleaved=True where channel 2i pairs with 2i+1), or pass the config as a dict without "
            f"'model_type' for the generic half-split reading")
    if entry.refused is not None:
        raise FlexRopeError(f"model_type {model_type!r}: {entry.refused}")
    if entry.multiaxis:
        raise FlexRopeError(
            f"model_type {model_type!r} rotates by multi-axis positions (M-RoPE): use "
            f"MultiAxisRotaryEmbedding.from_hf_config(config)")
    return text, entry


def settings_from_hf_config(config, layer_type: str | None = None) -> dict:
    """``head_dim``, ``theta_base``, ``context_length``, ``rotary_dim``, ``interleaved``, ``scaling`` and the
    ``qk_head_dim`` the attention scales its scores by. A composite config is read through its text config."""
    config, entry = config_family(config)
    parameters = _parameters(config, layer_type)
    layer = _layer_config(config, layer_type) if layer_type is not None else config
    rope_head_dim = config_value(layer, "qk_rope_head_dim")  # DeepSeek's MLA: the rotary slice of each head
    if entry.rope_slice and rope_head_dim is None:
        raise FlexRopeError("the config of a multi-head latent attention family has no 'qk_rope_head_dim'")
    head_dim = rope_head_dim if rope_head_dim is not None else config_value(layer, "head_dim")
    if head_dim is None:
        hidden, heads = config_value(layer, "hidden_size"), config_value(layer, "num_attention_heads")
        if hidden is None or heads is None:
            raise FlexRopeError("the config has neither 'head_dim' nor 'hidden_size' and 'num_attention_heads'")
        if type(hidden) is not int or type(heads) is not int or hidden <= 0 or heads <= 0:
            raise FlexRopeError(f"hidden_size={hidden!r} and num_attention_heads={heads!r}: expected positive ints")
        head_dim = hidden // heads
    theta = parameters.pop("rope_theta", None)
    if theta is None:
        theta = config_value(config, "rope_theta")
    theta = _positive(_DEFAULT_THETA if theta is None else theta, "rope_theta")
    partial = parameters.pop("partial_rotary_factor", None)
    for key in ("partial_rotary_factor", "rotary_pct"):
        partial = config_value(layer, key) if partial is None else partial
    partial = _positive(1.0 if partial is None else partial, "partial_rotary_factor", at_most=1.0)
    # keys of a YaRN dict that are not part of the frequencies (Ministral 3, Mistral 4): the length the
    # extension reaches (the context length where the config has none outside), and Llama 4's query scale,
    # which multiplies q by 1 + beta * log(1 + floor(position / L0)) in the attention, not a rotation
    reach = parameters.pop("max_position_embeddings", None)
    parameters.pop("llama_4_scaling_beta", None)
    max_positions = config_value(config, "max_position_embeddings")
    if max_positions is None:
        max_positions = reach
    if max_positions is None:
        raise FlexRopeError("the config has no 'max_position_embeddings'")
    interleaved = entry.interleaved
    if entry.interleave_field is not None and config_value(config, entry.interleave_field) is not None:
        interleaved = config_value(config, entry.interleave_field) is True
    elif entry is _GENERIC:
        interleaved = config_value(config, "rope_interleave") is True
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type == "proportional" or entry.rope_slice:
        # proportional: the fraction shapes the frequencies, over the whole head; MLA: the slice is the
        # rotary dim already (DeepSeek-V4 states both)
        rotary_dim = head_dim
    elif entry.rotary_dim_field is not None and config_value(config, entry.rotary_dim_field) is not None:
        rotary_dim = config_value(config, entry.rotary_dim_field)
    else:
        rotary_dim = int(head_dim * partial)
    scaling = None
    if rope_type != "default":
        scaling = dict(parameters)
        if rope_type == "proportional":
            scaling["partial_rotary_factor"] = partial
        elif rope_type == "dynamic":
            # the reference grows dynamic NTK from max_position_embeddings
            scaling["original_max_position_embeddings"] = max_positions
        elif rope_type in ("yarn", "llama3", "longrope"):
            original = config_value(config, "original_max_position_embeddings")  # Phi-3 keeps it outside the dict
            if original is not None:
                scaling["original_max_position_embeddings"] = original
            scaling.setdefault("original_max_position_embeddings", max_positions)
            if scaling.get("factor") is None and rope_type in ("yarn", "longrope"):
                scaling["factor"] = max_positions / scaling["original_max_position_embeddings"]
    qk_head_dim = head_dim
    if rope_head_dim is not None and config_value(layer, "qk_nope_head_dim") is not None:
        qk_head_dim = rope_head_dim + config_value(layer, "qk_nope_head_dim")
    elif entry.rope_slice and config_value(layer, "head_dim") is not None:  # DeepSeek-V4: the slice of head_dim
        qk_head_dim = config_value(layer, "head_dim")
    return {
        "head_dim": head_dim,
        "theta_base": theta,
        "context_length": max_positions,
        "rotary_dim": rotary_dim,
        "interleaved": interleaved,
        "scaling": scaling,
        "qk_head_dim": qk_head_dim,
    }


def layer_rope(config, layer_idx: int) -> tuple[bool, str | None]:
    """Whether layer ``layer_idx`` rotates, and the ``layer_type`` its module needs (None where the config
    has one rope_parameters for every layer)."""
    config, entry = config_family(config)
    layers = config_value(config, "num_hidden_layers")
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0 or (
            layers is not None and layer_idx >= layers):
        bound = f" < num_hidden_layers={layers}" if layers is not None else ""
        raise FlexRopeError(f"layer_idx={layer_idx!r}: expected an int >= 0{bound}")
    types = config_value(config, "layer_types")
    kind = types[layer_idx] if types is not None and layer_idx < len(types) else None
    if entry.no_rope == "no_rope_layers":
        flags = config_value(config, "no_rope_layers")
        if flags is not None and not flags[layer_idx]:  # transformers: use_rope = no_rope_layers[layer_idx]
            return False, None
    elif entry.no_rope == "sliding_only" and kind is not None and kind != "sliding_attention":
        return False, None
    parameters = config_value(config, "rope_parameters") or config_value(config, "rope_scaling") or {}
    per_type = [name for name, value in dict(parameters).items() if isinstance(value, dict)]
    if not per_type:
        return True, None
    if kind not in per_type:
        raise FlexRopeError(
            f"rope_parameters is given per layer type ({', '.join(per_type)}) and layer {layer_idx}'s type "
            f"({kind!r}, from layer_types) is not one of them: pass layer_type= one of them instead")
    return True, kind


_TEXT_KEYS = ("text_config", "decoder", "generator")  # where composite configs keep their text model's


def text_config(config):
    """The config of the text model: a multimodal config's ``text_config`` (as ``get_text_config()`` finds it),
    else the config itself. ``AutoConfig.from_pretrained`` returns the composite config of a vision-language
    checkpoint, whose rotary settings live in its text part."""
    if isinstance(config, dict):
        for key in _TEXT_KEYS:
            if isinstance(config.get(key), dict):
                return text_config(config[key])
        return config
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            sub = getter(decoder=True)
        except (TypeError, ValueError):  # ambiguous or an older signature: look at the names ourselves
            sub = None
        if sub is not None and sub is not config:
            # an encoder-decoder config answers with a renamed copy of itself (decoder_* keys as the plain
            # ones), a new object on every call: that copy is the text config, not a composite to open again
            return sub if type(sub) is type(config) else text_config(sub)
    for key in _TEXT_KEYS:
        sub = config_value(config, key)
        if sub is not None and not isinstance(sub, (str, int, float, bool)):
            return text_config(sub)
    return config


# A config's max_position_embeddings becomes the tables' length unless the caller says otherwise, up to this size
# (Llama 4 Scout's 10,485,760 positions would take 10 GiB; a million positions at head dim 128 take 1 GiB).
TABLES_LIMIT_BYTES = 2 * 2**30


def check_default_length(length: object, bytes_per_position: int) -> None:
    """The config's max_position_embeddings as the tables' default length: a positive int (checked before it is
    multiplied) whose tables (``bytes_per_position`` each) stay within TABLES_LIMIT_BYTES; else a FlexRopeError
    asking for ``context_length=``."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise FlexRopeError(f"the config's max_position_embeddings={length!r}: expected a positive int; fix the "
                            f"config, or pass context_length=")
    size = length * bytes_per_position
    if size > TABLES_LIMIT_BYTES:
        raise FlexRopeError(
            f"the config's max_position_embeddings={length:,} would make tables of {size / 2**30:.1f} GiB (cos and "
            f"sin, float32): pass context_length= the longest sequence you will run (a position past it is an "
            f"error, never wrapped), or context_length={length} to build them all")
