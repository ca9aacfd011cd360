"""torch.compile: no graph break (fullgraph), the eager numbers, and no recompilation per sequence length."""

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import flexrope
from flexrope import RotaryEmbedding, compute_rope

from flexrope.testing import tolerance

LENGTHS = (5, 8, 13, 21)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dynamic", [None, True])
def test_module_does_not_recompile_per_sequence_length(dynamic):
    rope = RotaryEmbedding(16, layout="b s h d", context_length=64)
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(lambda q, k, offset: rope(q, k, offset=offset), backend=counter, fullgraph=True,
                         dynamic=dynamic)
    for s in LENGTHS:
        q, k = torch.randn(2, s, 4, 16), torch.randn(2, s, 2, 16)
        for got, want in zip(step(q, k, 3), rope(q, k, offset=3)):
            assert torch.equal(got, want)
    # dynamic=None compiles once static, then once with a symbolic length; never again after that
    assert counter.frame_count == (1 if dynamic else 2)


@pytest.mark.parametrize("interleaved", [False, True])
def test_inductor_fullgraph_matches_eager_forward_and_backward(interleaved):
    cos, sin = flexrope.precompute_rope_params(32, context_length=64, rotary_dim=16)

    def fn(x, positions):
        return compute_rope(x, cos, sin, "b s (h d)", positions=positions, interleaved=interleaved, rotary_dim=16,
                            d=32)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for s in (7, 11):
        x = torch.randn(2, s, 3 * 32, requires_grad=True)
        positions = torch.randint(0, 64, (2, s))
        grad = torch.randn(2, s, 96)
        got = compiled(x, positions)
        (got_grad,) = torch.autograd.grad(got, x, grad)
        want = fn(x, positions)
        (want_grad,) = torch.autograd.grad(want, x, grad)
        torch.testing.assert_close(got, want, atol=tolerance(torch.float32, 8.0), rtol=0)
        torch.testing.assert_close(got_grad, want_grad, atol=tolerance(torch.float32, 8.0), rtol=0)


def test_a_callers_dynamic_compile_is_one_graph_across_the_size_thresholds():
    """Lengths 10..5000 cross the small-call and compiled-loop sizes: none of them is a guard when traced."""
    cos, sin = flexrope.precompute_rope_params(64, context_length=8192)
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda x, p: compute_rope(x, cos, sin, "b s h d", positions=p) * 2, backend=counter,
                       fullgraph=True, dynamic=True)
    for s in (10, 100, 1000, 5000):
        x, positions = torch.randn(1, s, 4, 64), torch.randint(0, 8192, (s,))
        assert torch.equal(fn(x, positions), compute_rope(x, cos, sin, "b s h d", positions=positions) * 2)
    assert counter.frame_count == 1


def test_a_negative_position_is_an_error_under_compile_too():
    cos, sin = flexrope.precompute_rope_params(16, context_length=32)
    fn = torch.compile(lambda x, p: compute_rope(x, cos, sin, positions=p), fullgraph=True)
    x = torch.randn(1, 2, 4, 16)
    fn(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RuntimeError, match="positions hold a position < 0 or >= 32"):
        fn(x, torch.tensor([0, -1, 2, 3]))
