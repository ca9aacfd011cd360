"""Greedy decoding with a KV cache: keys are rotated once, when they enter the cache, at their own position.

A one-layer toy model with grouped-query attention (4 query heads, 2 key/value heads) in (b, s, h, d).
Each step rotates only the new token, with ``offset`` = its position; the logits equal those of running the
whole sequence again without a cache.

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
        self.rope = flexrope.RotaryEmbedding(self.head_dim, layout="b s h d", context_length=context)

    def forward(self, tokens: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        """Logits of every token given; with ``cache`` (a list of (k, v)), only the new tokens are passed."""
        b, s = tokens.shape
        start = cache[0][0].shape[1] if cache else 0
        x = self.embed(tokens)
        q = self.W_query(x).view(b, s, self.q_heads, self.head_dim)
        k, v = self.W_kv(x).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
        q, k = self.rope(q, k, offset=start)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0][0], k], dim=1), torch.cat([cache[0][1], v], dim=1)
            cache[:] = [(k, v)]
        attend = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=cache is None or start == 0,
            enable_gqa=True,
        )
        return self.lm_head(attend.transpose(1, 2).reshape(b, s, -1))


@torch.no_grad()
def main(steps: int = 8) -> tuple[torch.Tensor, float]:
    torch.manual_seed(0)
    model = TinyModel()
    tokens = torch.tensor([[1, 7, 3]])
    cache: list = []
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
