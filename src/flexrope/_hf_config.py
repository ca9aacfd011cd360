"""Reading a Hugging Face model config (object or dict) into RotaryEmbedding settings.

transformers is never imported: a config is read through its attributes or keys alone. A value that is
absent or None falls back to its default; any other value, zero included, is taken as given and checked.
"""

from __future__ import annotations

import math

from ._errors import FlexRopeError

_DEFAULT_THETA = 10_000.0
# Names under which configs keep the same setting (GPT-J and GPT-2 style configs use the n_* ones).
_ALIASES = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
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
    parameters = config_value(config, "rope_parameters")
    if parameters is None:
        parameters = config_value(config, "rope_scaling")
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


def settings_from_hf_config(config, layer_type: str | None = None) -> dict:
    """``head_dim``, ``theta_base``, ``context_length``, ``rotary_dim``, ``interleaved``, ``scaling`` and the
    ``qk_head_dim`` the attention scales its scores by."""
    parameters = _parameters(config, layer_type)
    layer = _layer_config(config, layer_type) if layer_type is not None else config
    model_type = config_value(config, "model_type")
    rope_head_dim = config_value(layer, "qk_rope_head_dim")  # DeepSeek's MLA: the rotary slice of each head
    head_dim = rope_head_dim if rope_head_dim is not None else config_value(layer, "head_dim")
    if head_dim is None:
        hidden, heads = config_value(layer, "hidden_size"), config_value(layer, "num_attention_heads")
        if hidden is None or heads is None:
            raise FlexRopeError("the config has neither 'head_dim' nor 'hidden_size' and 'num_attention_heads'")
        head_dim = hidden // heads
    theta = parameters.pop("rope_theta", None)
    if theta is None:
        theta = config_value(config, "rope_theta")
    theta = _positive(_DEFAULT_THETA if theta is None else theta, "rope_theta")
    partial = parameters.pop("partial_rotary_factor", None)
    for key in ("partial_rotary_factor", "rotary_pct"):
        partial = config_value(layer, key) if partial is None else partial
    partial = _positive(1.0 if partial is None else partial, "partial_rotary_factor", at_most=1.0)
    max_positions = config_value(config, "max_position_embeddings")
    if max_positions is None:
        raise FlexRopeError("the config has no 'max_position_embeddings'")
    interleaved = model_type in ("gptj", "codegen") or config_value(config, "rope_interleave") is True
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type == "proportional":  # the fraction shapes the frequencies, over the whole head
        rotary_dim = head_dim
    elif model_type in ("gptj", "codegen") and config_value(config, "rotary_dim") is not None:
        rotary_dim = config_value(config, "rotary_dim")
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
    qk_nope = config_value(layer, "qk_nope_head_dim") if rope_head_dim is not None else None
    return {
        "head_dim": head_dim,
        "theta_base": theta,
        "context_length": max_positions,
        "rotary_dim": rotary_dim,
        "interleaved": interleaved,
        "scaling": scaling,
        "qk_head_dim": head_dim + qk_nope if qk_nope is not None else head_dim,
    }


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
            return text_config(sub)
    for key in _TEXT_KEYS:
        sub = config_value(config, key)
        if sub is not None and not isinstance(sub, (str, int, float, bool)):
            return text_config(sub)
    return config
