"""The same attention keeping (b, s, h, d) end to end: no transposes before the rotation, then
``scaled_dot_product_attention``.

Run: python examples/attention_bshd.py
"""

import torch
import torch.nn.functional as F
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
        # The projections give (b s (h d)); the layout says so, and head_dim fills in d.
        self.rope = flexrope.RotaryEmbedding(self.head_dim, layout="b s (h d)", context_length=context_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        queries, keys = self.rope(self.W_query(x), self.W_key(x))  # still (b s (h d))

        def heads(t):  # the layout scaled_dot_product_attention wants: (b h s d)
            return t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

        context = F.scaled_dot_product_attention(heads(queries), heads(keys), heads(self.W_value(x)), is_causal=True)
        return self.out_proj(context.transpose(1, 2).reshape(b, s, -1))


def main() -> torch.Tensor:
    torch.manual_seed(0)
    attention = MultiHeadAttention(d_model=64, num_heads=4)
    out = attention(torch.randn(2, 10, 64))
    print(f"(b s h d) attention: output {tuple(out.shape)}")
    return out


if __name__ == "__main__":
    main()
