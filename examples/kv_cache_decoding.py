"""Greedy decoding with a KV cache: keys are rotated once, straight into the cache, at their own position.

A one-layer toy model with grouped-query attention (4 query heads, 2 key/value heads) and QK-norm (an RMSNorm
over each head, as in Qwen3) in (b, s, h, d). The cache is preallocated; each step normalises and rotates only
the new tokens, with ``offset`` = their position, and writes the keys into ``cache_k[:, n:n + s]`` in the same
pass (``k_out=``). The logits equal those of running the whole sequence again without a cache.

Run: python examples/kv_cache_decoding.py
"""

import torch
import torch.nn.functional as F
from torch import nn

import flexrope


class TinyModel(nn.Module):
    def __init__(self, vocab: int = 50, d_model: int = 32, q_heads: int = 4, kv_heads: int = 2, context: int = 64):
        super().__init__()
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, d_model // q_heads
        self.embed = nn.Embedding(vocab, d_model)
        self.W_query = nn.Linear(d_model, q_heads * self.head_dim, bias=False)
        self.W_kv = nn.Linear(d_model, 2 * kv_heads * self.head_dim, bias=False)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6), nn.RMSNorm(self.head_dim, eps=1e-6)
        self.rope = flexrope.RotaryEmbedding(self.head_dim, layout="b s h d", context_length=context)
        self.context = context

    def new_cache(self, batch: int) -> dict:
        """Keys and values of every position, (b, context, kv_heads, head_dim) each, and how many are filled."""
        shape = (batch, self.context, self.kv_heads, self.head_dim)
        return {"k": torch.zeros(shape), "v": torch.zeros(shape), "length": 0}

    def forward(self, tokens: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """Logits of every token given; with ``cache`` (from new_cache), only the new tokens are passed."""
        b, s = tokens.shape
        start = cache["length"] if cache else 0
        x = self.embed(tokens)
        q = self.W_query(x).view(b, s, self.q_heads, self.head_dim)
        k, v = self.W_kv(x).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
        if cache is None:
            q, k = self.rope(q, k, q_norm=self.q_norm, k_norm=self.k_norm)
        else:
            end = start + s
            # norm, rotation and the write of the rotated keys into the cache, in one pass
            q, _ = self.rope(q, k, offset=start, q_norm=self.q_norm, k_norm=self.k_norm,
                             k_out=cache["k"][:, start:end])
            cache["v"][:, start:end] = v
            cache["length"] = end
            k, v = cache["k"][:, :end], cache["v"][:, :end]
        attend = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=not cache or start == 0,
            enable_gqa=True,
        )
        return self.lm_head(attend.transpose(1, 2).reshape(b, s, -1))


@torch.no_grad()
def main(steps: int = 8) -> tuple[torch.Tensor, float]:
    torch.manual_seed(0)
    model = TinyModel()
    tokens = torch.tensor([[1, 7, 3]])
    cache = model.new_cache(batch=1)
    logits = model(tokens, cache)
    worst = 0.0
    for _ in range(steps):
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
        logits = model(next_token, cache)
        full = model(tokens)[:, -1:]  # no cache: the whole sequence again
        worst = max(worst, (logits - full).abs().max().item())
    print(f"generated {tokens.tolist()[0]}; cached vs full logits differ by at most {worst:.2e}")
    return tokens, worst


if __name__ == "__main__":
    main()
