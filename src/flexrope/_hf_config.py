"""Reading a Hugging Face model config (object or dict) into RotaryEmbedding settings.

transformers is never imported: a config is read through its attributes or keys alone.
"""

from __future__ import annotations

from ._errors import FlexRopeError

_DEFAULT_THETA = 10_000.0


def _get(config, key: str, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    value = getattr(config, key, default)
    return default if value is None else value


def settings_from_hf_config(config) -> dict:
    """``head_dim``, ``theta_base``, ``context_length``, ``rotary_dim``, ``interleaved`` and ``scaling``."""
    head_dim = _get(config, "head_dim")
    if head_dim is None:
        hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
        if hidden is None or heads is None:
            raise FlexRopeError("the config has neither 'head_dim' nor 'hidden_size' and 'num_attention_heads'")
        head_dim = hidden // heads
    # transformers >= 5 keeps theta and the recipe in rope_parameters; older configs in rope_theta/rope_scaling
    parameters = dict(_get(config, "rope_parameters") or _get(config, "rope_scaling") or {})
    if any(isinstance(value, dict) for value in parameters.values()):
        raise FlexRopeError(
            f"rope_parameters is nested by layer type ({', '.join(parameters)}): build one RotaryEmbedding per "
            f"layer type from its own dict"
        )
    theta = parameters.pop("rope_theta", None) or _get(config, "rope_theta") or _DEFAULT_THETA
    partial = parameters.pop("partial_rotary_factor", None)
    if partial is None:
        partial = _get(config, "partial_rotary_factor") or _get(config, "rotary_pct") or 1.0
    max_positions = _get(config, "max_position_embeddings")
    if max_positions is None:
        raise FlexRopeError("the config has no 'max_position_embeddings'")
    interleaved = _get(config, "model_type") in ("gptj", "codegen")  # these rotate every two channels
    rotary_dim = _get(config, "rotary_dim") if interleaved else None
    rotary_dim = rotary_dim or int(head_dim * partial)
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    scaling = None
    if rope_type != "default":
        scaling = dict(parameters)
        if rope_type in ("dynamic",):
            # the reference grows dynamic NTK from max_position_embeddings
            scaling["original_max_position_embeddings"] = max_positions
        elif rope_type in ("yarn", "llama3", "longrope"):
            original = _get(config, "original_max_position_embeddings")  # Phi-3 keeps it outside the dict
            if original is not None:
                scaling["original_max_position_embeddings"] = original
            scaling.setdefault("original_max_position_embeddings", max_positions)
            if scaling.get("factor") is None and rope_type in ("yarn", "longrope"):
                scaling["factor"] = max_positions / scaling["original_max_position_embeddings"]
    return {
        "head_dim": head_dim,
        "theta_base": float(theta),
        "context_length": max_positions,
        "rotary_dim": rotary_dim,
        "interleaved": interleaved,
        "scaling": scaling,
    }
