"""The zoo: every family of flexrope's table against its own rotary module and apply function in the installed
transformers (test-only dependency), from the family's default config, on random q and k with per-row
positions. A family the installed transformers lacks is skipped, naming it."""

import importlib
import inspect
import re
import warnings

import pytest
import torch

from flexrope import FlexRopeError, RotaryEmbedding
from flexrope._families import FAMILIES

transformers = pytest.importorskip("transformers")
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name  # noqa: E402

SEQ = 8
# the reference's float32 angles at positions < SEQ + 16 are within ~1e-6 of ours (float64, rounded once)
TOL = {torch.float32: 2e-5, torch.bfloat16: 0.07}
# default configs that no checkpoint has (GLM-4-MoE: 4096 / 96 heads = 42 channels, half of them odd)
_OVERRIDES = {"glm4_moe": {"head_dim": 128}}
_NOT_TEXT = ("Vision", "Visual", "Vit", "2D", "Image", "Patch", "Audio")


def _config(model_type):
    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no model_type {model_type!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoConfig.for_model(model_type, **_OVERRIDES.get(model_type, {}))


def _modeling(model_type):
    name = model_type_to_module_name(model_type)
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def _rotary(modeling, config):
    """The family's text rotary module, built from the config."""
    classes = sorted((name, cls) for name, cls in vars(modeling).items() if isinstance(cls, type)
                     and name.endswith("RotaryEmbedding") and cls.__module__ == modeling.__name__)
    classes.sort(key=lambda item: any(word in item[0] for word in _NOT_TEXT))
    errors = []
    for name, cls in classes:
        try:
            return cls(config)
        except Exception as error:  # noqa: BLE001 - a class of another sub-model: try the next
            errors.append(f"{name}: {error}")
    raise AssertionError(f"no rotary class of {modeling.__name__} takes the config: {errors}")


def _layer_types(config):
    parameters = getattr(config, "rope_parameters", None) or {}
    per_type = [name for name, value in parameters.items() if isinstance(value, dict)]
    if not per_type:
        return [None]
    used = [name for name in dict.fromkeys(getattr(config, "layer_types", None) or []) if name in per_type]
    return used or per_type


def _reference(modeling, rotary, entry, q, k, positions, layer_type):
    """The family's q and k, as its attention rotates them, and the channel order of its output."""
    args = (q, positions) if layer_type is None else (q, positions, layer_type)
    out = rotary(*args)
    if isinstance(out, torch.Tensor) and out.is_complex():  # Llama 4, DeepSeek-V2: complex freqs_cis
        try:  # DeepSeek-V2 holds q and k as (b h s d), Llama 4 as (b s h d)
            return *modeling.apply_rotary_emb(q, k, out), None
        except RuntimeError:
            hq, hk = modeling.apply_rotary_emb(q.transpose(1, 2), k.transpose(1, 2), out)
            return hq.transpose(1, 2), hk.transpose(1, 2), None
    cos, sin = out[0], out[1]
    interleave_helper = getattr(modeling, "apply_rotary_pos_emb_interleave", None)
    if entry.rope_slice and interleave_helper is not None and entry.interleaved:
        # the helper returns the rotated pairs de-interleaved (every pair's first channel, then every second)
        d = q.shape[-1]
        hq, hk = interleave_helper(q, k, cos, sin)
        return hq, hk, list(range(0, d, 2)) + list(range(1, d, 2))
    if list(inspect.signature(modeling.apply_rotary_pos_emb).parameters)[1:3] == ["sin", "cos"]:
        # GPT-J, CodeGen: the module returns (sin, cos); (b s h d), one tensor per call, the first rotary_dim
        sin, cos = out[0], out[1]
        width = 2 * cos.shape[-1]
        hq, hk = (torch.cat([modeling.apply_rotary_pos_emb(x.transpose(1, 2)[..., :width], sin, cos).transpose(1, 2),
                             x[..., width:]], -1) for x in (q, k))
        return hq, hk, None
    apply = modeling.apply_rotary_pos_emb
    takes_k = list(inspect.signature(apply).parameters)[1:2] == ["k"]

    def call(qq, kk):
        if takes_k:
            return apply(qq, kk, cos, sin)
        try:
            return apply(qq, cos, sin), apply(kk, cos, sin)
        except TypeError:
            return apply(qq, kk, cos, sin)

    try:
        hq, hk = call(q, k)
        return hq, hk, None
    except RuntimeError:  # the attention passes only the rotated channels (Phi, GPT-J): the first ones
        for width in (cos.shape[-1], 2 * cos.shape[-1]):
            try:
                hq, hk = call(q[..., :width], k[..., :width])
            except RuntimeError:
                continue
            return torch.cat([hq, q[..., width:]], -1), torch.cat([hk, k[..., width:]], -1), None
        raise


def _check(model_type, dtype):
    entry = FAMILIES[model_type]
    config = _config(model_type)
    if entry.refused is not None or entry.multiaxis:
        reason = "MultiAxisRotaryEmbedding" if entry.multiaxis else re.escape(entry.refused)
        with pytest.raises(FlexRopeError, match=reason):
            RotaryEmbedding.from_hf_config(config)
        return
    modeling = _modeling(model_type)
    rotary = _rotary(modeling, config)
    generator = torch.Generator().manual_seed(0)
    positions = torch.stack([torch.arange(SEQ), torch.arange(SEQ) + 13])  # per-row positions
    for layer_type in _layer_types(config):
        rope = RotaryEmbedding.from_hf_config(config, layer_type=layer_type, context_length=SEQ + 16)
        q = torch.randn(2, 2, SEQ, rope.head_dim, generator=generator).to(dtype)
        k = torch.randn(2, 1, SEQ, rope.head_dim, generator=generator).to(dtype)
        hq, hk, channels = _reference(modeling, rotary, entry, q, k, positions, layer_type)
        ours_q, ours_k = rope(q, k, positions=positions)
        if channels is not None:
            ours_q, ours_k = ours_q[..., channels], ours_k[..., channels]
        for ours, theirs in ((ours_q, hq), (ours_k, hk)):
            assert ours.shape == theirs.shape
            diff = (ours.float() - theirs.float()).abs().max().item()
            assert diff <= TOL[dtype], f"{model_type} ({layer_type}): max |diff| {diff}"


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_matches_transformers(model_type):
    _check(model_type, torch.float32)


@pytest.mark.parametrize("model_type", ["llama", "cohere", "deepseek_v3", "gemma3_text", "phi"])
def test_family_matches_transformers_in_bfloat16(model_type):
    _check(model_type, torch.bfloat16)


def test_every_multi_axis_family_is_sent_to_the_multi_axis_module():
    from flexrope._mrope_families import FAMILIES as MULTI_AXIS_FAMILIES

    not_sent = sorted(name for name in MULTI_AXIS_FAMILIES if not (name in FAMILIES and FAMILIES[name].multiaxis))
    assert not not_sent, f"read as 1-D (or unknown) by RotaryEmbedding.from_hf_config: {not_sent}"
    flat = {"model_type": "qwen2_vl", "hidden_size": 256, "num_attention_heads": 2, "max_position_embeddings": 64,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}  # an older Qwen2-VL config.json
    with pytest.raises(FlexRopeError, match="MultiAxisRotaryEmbedding.from_hf_config"):
        RotaryEmbedding.from_hf_config(flat)
