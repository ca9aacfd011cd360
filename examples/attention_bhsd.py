"""Multi-head attention written from scratch in the book's (b, h, s, d) style, with flexrope for RoPE.

Run: python examples/attention_bhsd.py
"""

import torch
from torch import nn

import flexrope


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, context_length: int = 256):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.W_query = nn.Linear(d_model, d_model, bias=False)
        self.W_key = nn.Linear(d_model, d_model, bias=False)
        self.W_value = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.rope = flexrope.RotaryEmbedding(self.head_dim, layout="b h s d", context_length=context_length)
        mask = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape

        def heads(t):  # (b s (h d)) -> (b h s d)
            return t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

        queries, keys, values = heads(self.W_query(x)), heads(self.W_key(x)), heads(self.W_value(x))
        queries, keys = self.rope(queries, keys)
        scores = queries @ keys.transpose(2, 3) / self.head_dim**0.5
        scores = scores.masked_fill(self.mask[:s, :s], float("-inf"))
        context = torch.softmax(scores, dim=-1) @ values  # (b h s d)
        return self.out_proj(context.transpose(1, 2).reshape(b, s, -1))


def main() -> torch.Tensor:
    torch.manual_seed(0)
    attention = MultiHeadAttention(d_model=64, num_heads=4)
    out = attention(torch.randn(2, 10, 64))
    print(f"(b h s d) attention: output {tuple(out.shape)}")
    return out


if __name__ == "__main__":
    main()
