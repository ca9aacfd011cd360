"""Multi-axis RoPE at diffusion-transformer sizes: flexrope's presets against diffusers' own path and against
flexrope's 1-D compute_rope on the same tensor (the multi-axis call builds per-token tables first), the two
timed in alternating rounds.

    python benchmarks/bench_multiaxis.py

Flux: (1, 4096, 24, 128), a 64 x 64 latent; Wan: (1, 21 x 30 x 52, 12, 128). float32 and bfloat16.
"""

import platform

import harness
import torch

import flexrope
from flexrope import presets


def row(case: str, ours: float, one_d: float, peer: float) -> str:
    """Seconds as ms: the multi-axis call, the 1-D call on the same tensor, their ratio, the peer's call."""
    return f"{case:<28} {ours * 1e3:>14.2f} {one_d * 1e3:>8.2f} {ours / one_d:>6.2f} {peer * 1e3:>13.2f}"


def main() -> None:
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"{'case':<28} {'multi-axis ms':>14} {'1-D ms':>8} {'ratio':>6} {'diffusers ms':>13}")
    cos1d, sin1d = flexrope.precompute_rope_params(128, context_length=65_536)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            # Flux: 64 x 64 image tokens
            ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(64.0), torch.arange(64.0), indexing="ij"),
                              -1).reshape(-1, 3)
            x = torch.randn(1, 4096, 24, 128).to(dtype)
            rope, positions = presets.flux(), ids.long().T
            embed = FluxPosEmbed(theta=10_000, axes_dim=[16, 56, 56])
            ours, one_d = harness.compare(lambda: rope(x, positions=positions),
                                          lambda: flexrope.compute_rope(x, cos1d, sin1d, "b s h d", interleaved=True),
                                          rounds=21, number=5)
            peer, _ = harness.compare(lambda: apply_rotary_emb(x.transpose(1, 2), embed(ids), use_real=True,
                                                    use_real_unbind_dim=-1), lambda: None, rounds=3, number=2)
            print(row("flux " + name, ours, one_d, peer))
            # Wan: 21 x 30 x 52 patches
            f, y, w = 21, 30, 52
            x = torch.randn(1, f * y * w, 12, 128).to(dtype)
            rope = presets.wan(128)
            wan_embed = WanRotaryPosEmbed(128, patch_size=(1, 2, 2), max_seq_len=1024)
            latent = torch.zeros(1, 16, f, 2 * y, 2 * w)

            def diffusers_wan():
                cos, sin = wan_embed(latent)
                x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
                out = torch.empty_like(x, dtype=torch.float32)
                out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
                out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
                return out.to(x.dtype)

            ours, one_d = harness.compare(lambda: rope(x, f=f, y=y, x=w),
                                          lambda: flexrope.compute_rope(x, cos1d, sin1d, "b s h d", interleaved=True),
                                          rounds=21, number=5)
            peer, _ = harness.compare(diffusers_wan, lambda: None, rounds=3, number=2)
            print(row("wan " + name, ours, one_d, peer))


if __name__ == "__main__":
    main()
