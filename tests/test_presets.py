"""Presets against the models' own code: diffusers' Flux and Wan, transformers' Pixtral and Qwen2-VL vision
tower (test-only dependencies), float32 and bfloat16, within the references' float32 angle error."""

import pytest
import torch

from flexrope import presets

EPS32 = torch.finfo(torch.float32).eps


def _assert_close(ours, theirs, max_position, magnitude, dtype):
    bound = 8 * EPS32 * (max_position + 16) * magnitude
    if dtype == torch.bfloat16:  # both sides round the result: half an ulp each
        bound = bound + torch.finfo(torch.bfloat16).eps * magnitude
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    difference = (ours.float() - theirs.float()).abs().max()
    assert difference <= bound, (difference, bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flux_matches_diffusers(dtype):
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.zeros(12, 3), torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(6.0),
                                                                       torch.arange(8.0), indexing="ij"), -1
                                                        ).reshape(-1, 3)])  # 12 text tokens, a 6 x 8 image
    cos, sin = FluxPosEmbed(theta=10_000, axes_dim=[16, 56, 56])(ids)
    x = torch.randn(1, 3, ids.shape[0], 128, generator=gen).to(dtype)  # (b h s d), as Flux's attention holds it
    expected = apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1)
    rope = presets.flux()  # layout "b s h d"
    ours = rope(x.transpose(1, 2), positions=ids.long().T).transpose(1, 2)
    _assert_close(ours, expected, ids.max(), x.abs().max().float(), dtype)


def _wan_rotation(hidden_states, freqs_cos, freqs_sin):
    """Wan's attention processor's rotation (diffusers defines it inside the processor): interleaved pairs."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wan_matches_diffusers(dtype):
    pytest.importorskip("diffusers")
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    head_dim, frames, rows, columns = 128, 3, 4, 5
    rotary = WanRotaryPosEmbed(head_dim, patch_size=(1, 2, 2), max_seq_len=1024)
    cos, sin = rotary(torch.zeros(1, 16, frames, 2 * rows, 2 * columns))  # (1, s, 1, d) each
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, frames * rows * columns, 4, head_dim, generator=gen).to(dtype)  # (b s h d)
    expected = _wan_rotation(x.float(), cos, sin).to(dtype)
    ours = presets.wan(head_dim)(x, f=frames, y=rows, x=columns)
    _assert_close(ours, expected, max(frames, rows, columns), x.abs().max().float(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pixtral_matches_transformers(dtype):
    transformers = pytest.importorskip("transformers")
    from transformers.models.pixtral import modeling_pixtral

    config = transformers.PixtralVisionConfig(hidden_size=256, num_attention_heads=4, head_dim=64)
    rotary = modeling_pixtral.PixtralVisionRotaryEmbedding(config)
    rows, columns = 5, 7
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij"), -1).reshape(-1, 2)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, rows * columns, 64, generator=gen).to(dtype)  # (b h s d)
    cos, sin = rotary(q, grid)
    expected, _ = modeling_pixtral.apply_rotary_pos_emb(q, q, cos, sin, unsqueeze_dim=0)
    ours = presets.pixtral(64, theta_base=config.rope_parameters["rope_theta"])(q, y=rows, x=columns)
    _assert_close(ours, expected, max(rows, columns), q.abs().max().float(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen2_vl_vision_matches_transformers(dtype):
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl import configuration_qwen2_vl, modeling_qwen2_vl

    config = configuration_qwen2_vl.Qwen2VLVisionConfig(embed_dim=256, num_heads=4)
    rotary = modeling_qwen2_vl.Qwen2VLVisionRotaryEmbedding(config)
    rows, columns = 6, 4
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij"), -1).reshape(-1, 2)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(rows * columns, 4, 64, generator=gen).to(dtype)  # (s h d), as the vision attention holds it
    cos, sin = rotary(q, grid)
    expected, _ = modeling_qwen2_vl.apply_rotary_pos_emb_vision(q, q, cos, sin)
    ours = presets.qwen2_vl_vision(64, theta_base=config.rope_parameters["rope_theta"])(q, y=rows, x=columns)
    _assert_close(ours, expected, max(rows, columns), q.abs().max().float(), dtype)
