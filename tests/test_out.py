"""out= (q_out= / k_out=): the rotation written straight into a tensor the caller owns, e.g. a KV cache slice.

Every backend (the C loop, eager, compiled, Triton in its interpreter) against rotating then copying,
bitwise; bad outs refused with nothing written.
"""

import pytest
import torch

import flexrope
from flexrope import FlexRopeError, RotaryEmbedding, compute_rope

BACKENDS = ["native", "eager", "compiled", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("the CPU tensors here need Triton's interpreter")
    monkeypatch.setenv("FLEXROPE_BACKEND", request.param)
    return request.param


def _tables(d=8, rotary_dim=None, length=32):
    return flexrope.precompute_rope_params(d, context_length=length, rotary_dim=rotary_dim)


# (layout, x shape, cache shape, the cache slice of x's shape at n .. n + s)
CASES = [
    ("b s h d", (2, 3, 2, 8), (2, 9, 2, 8), lambda c, n, s: c[:, n:n + s]),
    ("b h s d", (2, 2, 3, 8), (2, 2, 9, 8), lambda c, n, s: c[:, :, n:n + s]),
    ("s b h d", (3, 2, 2, 8), (9, 2, 2, 8), lambda c, n, s: c[n:n + s]),
    # a "b h s d" cache written through a "b s h d" call
    ("b s h d", (2, 3, 2, 8), (2, 2, 9, 8), lambda c, n, s: c[:, :, n:n + s].transpose(1, 2)),
    ("b s (h d)", (2, 3, 16), (2, 9, 16), lambda c, n, s: c[:, n:n + s]),
]


@pytest.mark.parametrize("layout, shape, cache_shape, window", CASES)
@pytest.mark.parametrize("interleaved, rotary_dim", [(False, None), (True, 6), (False, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_into_cache_slice_equals_rotate_then_copy(backend, layout, shape, cache_shape, window, interleaved,
                                                      rotary_dim, dtype):
    if backend == "compiled" and (interleaved or rotary_dim or dtype != torch.float32):
        pytest.skip("one variant per layout for the compiled loop (seconds per compile)")
    cos, sin = _tables(rotary_dim=rotary_dim)
    lengths = {"h": 2} if "(" in layout else {}
    x = torch.randn(shape).to(dtype)
    kwargs = dict(offset=4, interleaved=interleaved, rotary_dim=rotary_dim, **lengths)
    expected = torch.full(cache_shape, 7.0, dtype=dtype)
    window(expected, 4, 3).copy_(compute_rope(x, cos, sin, layout, **kwargs))
    cache = torch.full(cache_shape, 7.0, dtype=dtype)
    before = x.clone()
    result = compute_rope(x, cos, sin, layout, out=window(cache, 4, 3), **kwargs)
    assert result.data_ptr() == window(cache, 4, 3).data_ptr()
    assert torch.equal(cache, expected)  # the slice bitwise, and nothing outside it touched
    assert torch.equal(x, before)


def test_out_with_positions_equals_rotate_then_copy(backend):
    cos, sin = _tables()
    x = torch.randn(2, 3, 2, 8)
    positions = torch.tensor([[5, 1, 9], [0, 2, 3]])
    cache = torch.zeros(2, 6, 2, 8)
    compute_rope(x, cos, sin, "b s h d", positions=positions, out=cache[:, 2:5])
    assert torch.equal(cache[:, 2:5], compute_rope(x, cos, sin, "b s h d", positions=positions))


def test_out_x_itself_is_in_place(backend):
    cos, sin = _tables()
    x = torch.randn(2, 3, 2, 8)
    expected = compute_rope(x, cos, sin, "b s h d", offset=2)
    assert compute_rope(x, cos, sin, "b s h d", offset=2, out=x) is x
    assert torch.equal(x, expected)


def test_module_q_out_k_out(backend):
    rope = RotaryEmbedding(8, layout="b s h d", context_length=32)
    q, k = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 2, 8)
    q_expected, k_expected = rope(q, k, offset=5)
    cache_k, q_buffer = torch.zeros(2, 8, 2, 8), torch.empty(2, 1, 4, 8)
    q_rot, k_rot = rope(q, k, offset=5, q_out=q_buffer, k_out=cache_k[:, 5:6])
    assert q_rot is q_buffer and k_rot.data_ptr() == cache_k[:, 5:6].data_ptr()
    assert torch.equal(q_buffer, q_expected) and torch.equal(cache_k[:, 5:6], k_expected)
    assert cache_k[:, :5].abs().sum() == 0 and cache_k[:, 6:].abs().sum() == 0
    # only k into the cache, q in place
    q2 = q.clone()
    q_rot, _ = rope(q2, k, offset=5, q_out=q2, k_out=cache_k[:, 6:7])
    assert q_rot is q2 and torch.equal(q2, q_expected) and torch.equal(cache_k[:, 6:7], k_expected)


def _refused(match, *args, **kwargs):
    with pytest.raises(FlexRopeError, match=match):
        compute_rope(*args, **kwargs)


def test_bad_out_is_refused_with_nothing_written():
    cos, sin = _tables()
    x = torch.randn(2, 3, 2, 8)
    buffer = torch.randn(2, 4, 2, 8)
    kept = buffer.clone()
    _refused(r"out has shape \(2, 4, 2, 8\) but x has \(2, 3, 2, 8\)", x, cos, sin, "b s h d", out=buffer)
    _refused(r"out has dtype torch.float64 but x has torch.float32", x, cos, sin, "b s h d",
             out=torch.zeros(2, 3, 2, 8, dtype=torch.float64))
    _refused("out is a list", x, cos, sin, "b s h d", out=[0])
    _refused("out is a torch.sparse_coo tensor", x, cos, sin, "b s h d", out=torch.zeros(2, 3, 2, 8).to_sparse())
    _refused("overlaps x", buffer[:, :3], cos, sin, "b s h d", out=buffer[:, 1:])
    _refused("overlap in memory", x, cos, sin, "b s h d", out=torch.zeros(1, 1, 1, 8).expand(2, 3, 2, 8))
    # strides torch's own check calls too hard to tell (element (0, 0, 1, 0) is element (0, 0, 0, 4))
    _refused("overlap in memory", x, cos, sin, "b s h d", out=torch.zeros(64).as_strided((2, 3, 2, 8), (24, 8, 4, 1)))
    _refused("position", x, cos, sin, "b s h d", positions=torch.tensor([0, 1, 40]), out=buffer[:, 1:])
    _refused("out= with x requiring grad", x.requires_grad_(), cos, sin, "b s h d", out=buffer[:, 1:])
    _refused("inplace=True and out=", x.detach(), cos, sin, "b s h d", inplace=True, out=buffer[:, 1:])
    assert torch.equal(buffer, kept)


def test_views_of_one_buffer_that_share_no_element_are_not_overlap():
    cos, sin = _tables()
    qkv = torch.randn(2, 3, 2, 16)  # q in the first 8 channels of each head, its rotation into the last 8
    q, into = qkv[..., :8], qkv[..., 8:]
    expected = compute_rope(q, cos, sin, "b s h d")
    compute_rope(q, cos, sin, "b s h d", out=into)
    assert torch.equal(into, expected)


def test_module_bad_k_out_names_k():
    rope = RotaryEmbedding(8, layout="b s h d", context_length=32)
    q, k = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 2, 8)
    with pytest.raises(FlexRopeError, match=r"k_out has shape \(2, 1, 4, 8\) but k has \(2, 1, 2, 8\)"):
        rope(q, k, q_out=torch.empty_like(q), k_out=torch.empty_like(q))
    with pytest.raises(FlexRopeError, match="k_out is a torch.sparse_coo tensor"):
        rope(q, k, k_out=torch.zeros_like(k).to_sparse())


def _index_copied(x, rotated, cache, index, layout):
    """The reference: index_copy_ of the unfused rotation, token by token (negative indices skipped)."""
    expected = cache.clone()
    seq_dim = layout.split().index("s")
    for row in range(index.shape[0]):
        keep = (index[row] >= 0).nonzero().flatten()
        target, source = expected.select(0, row), rotated.select(0, row)
        target.index_copy_(seq_dim - 1, index[row][keep], source.index_select(seq_dim - 1, keep))
    return expected


@pytest.mark.parametrize("layout, shape, cache_shape", [("b s h d", (2, 4, 2, 8), (2, 6, 2, 8)),
                                                       ("b h s d", (2, 2, 4, 8), (2, 2, 6, 8))])
@pytest.mark.parametrize("per_row", [False, True])
def test_out_index_equals_index_copy_and_skips_negative(layout, shape, cache_shape, per_row):
    cos, sin = _tables()
    x = torch.randn(shape)
    index = torch.tensor([[5, 0, -1, 2], [1, -3, 4, 3]]) if per_row else torch.tensor([5, -1, 0, 3])
    cache = torch.randn(cache_shape)
    expected = _index_copied(x, compute_rope(x, cos, sin, layout, offset=3), cache, index.expand(2, 4), layout)
    assert compute_rope(x, cos, sin, layout, offset=3, out=cache, out_index=index) is cache
    assert torch.equal(cache, expected)


def test_bad_out_index_is_refused_with_nothing_written():
    cos, sin = _tables()
    x, cache = torch.randn(2, 3, 2, 8), torch.randn(2, 5, 2, 8)
    kept = cache.clone()
    _refused("past out's sequence length 5", x, cos, sin, "b s h d", out=cache, out_index=torch.tensor([0, 5, 1]))
    _refused("repeats an index", x, cos, sin, "b s h d", out=cache, out_index=torch.tensor([1, 2, 1]))
    _refused(r"expected an integer tensor \(3,\) or \(2, 3\)", x, cos, sin, "b s h d", out=cache,
             out_index=torch.tensor([0, 1]))
    _refused("out_index is a torch.sparse_coo tensor", x, cos, sin, "b s h d", out=cache,
             out_index=torch.tensor([0, 1, 2]).to_sparse())
    _refused("needs out=", x, cos, sin, "b s h d", out_index=torch.tensor([0, 1, 2]))
    _refused(r"out overlaps x in memory without being x itself .*pass a tensor apart from it$", cache[:, :3], cos,
             sin, "b s h d", out=cache, out_index=torch.tensor([2, 3, 4]))  # x: the first tokens of out
    assert torch.equal(cache, kept)
    # repeated negative indices are fine: every one of them is skipped
    compute_rope(x, cos, sin, "b s h d", out=cache, out_index=torch.tensor([-1, 2, -1]))
    assert torch.equal(cache[:, [0, 1, 3, 4]], kept[:, [0, 1, 3, 4]])


def test_out_under_torch_compile_has_no_graph_break():
    cos, sin = _tables()
    x, cache = torch.randn(1, 3, 2, 8), torch.zeros(1, 6, 2, 8)
    step = torch.compile(lambda x, into: compute_rope(x, cos, sin, "b s h d", offset=1, out=into), fullgraph=True,
                         backend="eager")
    step(x, cache[:, 1:4])
    assert torch.equal(cache[:, 1:4], compute_rope(x, cos, sin, "b s h d", offset=1))
    assert cache[:, 0].abs().sum() == 0 and cache[:, 4:].abs().sum() == 0


def test_in_place_calls_under_torch_compile_have_no_graph_break():
    """out=x, inplace=True and the module's q_out=q / k_out=k traced whole (the in-place checks that read what a
    traced graph cannot, inference and overlap, are left to torch's own in-place operations there)."""
    cos, sin = _tables()
    rope = RotaryEmbedding(8, layout="b s h d", context_length=32)
    norm = (torch.rand(8) + 0.5, 1e-6, 0.0)
    calls = {
        "out=x": lambda x, k: compute_rope(x, cos, sin, "b s h d", offset=1, out=x),
        "inplace": lambda x, k: compute_rope(x, cos, sin, "b s h d", offset=1, inplace=True),
        "normed out=x": lambda x, k: compute_rope(x, cos, sin, "b s h d", offset=1, norm_weight=norm[0], out=x),
        "module": lambda x, k: rope(x, k, offset=1, q_out=x, k_out=k, q_norm=norm, k_norm=norm),
    }
    q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 2, 8)
    for name, call in calls.items():
        expected_q, expected_k = q.clone(), k.clone()
        call(expected_q, expected_k)
        got_q, got_k = q.clone(), k.clone()
        with torch.no_grad():
            torch.compile(call, fullgraph=True, backend="eager")(got_q, got_k)
        torch._dynamo.reset()
        assert not torch.equal(got_q, q), name  # written in place
        # (the traced norm is torch's formula, the eager one the C loop's: the last bit may differ)
        torch.testing.assert_close(got_q, expected_q, rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(got_k, expected_k, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("norm", [False, True])
def test_out_x_itself_has_the_in_place_checks(norm):
    """out=x (q_out=q on the module, beside k's own out or not) is in place: an x whose elements overlap (expanded)
    or an inference tensor outside inference_mode is refused with nothing written, with the fused norm or not."""
    cos, sin = _tables()
    extra = dict(norm_weight=torch.rand(8) + 0.5) if norm else {}
    row = torch.randn(1, 3, 2, 8)
    expanded = row.expand(2, 3, 2, 8)
    _refused("out=x on a tensor whose elements overlap", expanded, cos, sin, "b s h d", out=expanded, **extra)
    with torch.inference_mode():
        inference = torch.randn(1, 3, 2, 8)
    kept = inference.clone()
    _refused("out=x on an inference tensor outside inference_mode", inference, cos, sin, "b s h d", out=inference,
             **extra)
    assert torch.equal(inference, kept)
    rope = RotaryEmbedding(8, layout="b s h d", context_length=32)
    norms = dict(q_norm=(extra["norm_weight"], 1e-6, 0.0), k_norm=(extra["norm_weight"], 1e-6, 0.0)) if norm else {}
    k, cache = torch.randn(2, 3, 2, 8), torch.zeros(2, 3, 2, 8)
    for outs in (dict(q_out=expanded), dict(q_out=expanded, k_out=cache), dict(q_out=expanded, k_out=k)):
        with pytest.raises(FlexRopeError, match="q_out=q on a tensor whose elements overlap"):
            rope(expanded, k.clone(), **outs, **norms)
    with pytest.raises(FlexRopeError, match="q_out=q on an inference tensor"):
        rope(inference, k[:1], q_out=inference, k_out=cache[:1], **norms)
    assert torch.equal(inference, kept) and torch.equal(row.expand(2, 3, 2, 8), expanded)
    assert cache.abs().sum() == 0


@pytest.mark.parametrize("norm", [False, True])
def test_module_out_over_the_other_operand_is_refused_with_nothing_written(norm):
    """q_out over k (or k_out over q, or the two outs over each other) would overwrite an input before it is read:
    refused, nothing written."""
    rope = RotaryEmbedding(8, layout="b s h d", context_length=32)
    norms = dict(q_norm=(torch.ones(8), 1e-6, 0.0), k_norm=(torch.ones(8), 1e-6, 0.0)) if norm else {}
    buffer = torch.randn(1, 3, 8, 8)  # q in heads 0-3, k in heads 4-5
    q, k, spare = buffer[:, :, :4], buffer[:, :, 4:6], buffer[:, :, 6:]
    kept = buffer.clone()
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            with pytest.raises(FlexRopeError, match="q_out overlaps k in memory"):
                rope(q[:, :, :2], k, q_out=k, **norms)
            with pytest.raises(FlexRopeError, match="k_out overlaps q in memory"):
                rope(q, k, k_out=buffer[:, :, 2:4], **norms)
            with pytest.raises(FlexRopeError, match="q_out and k_out overlap in memory"):
                rope(q[:, :, :2], k, q_out=spare, k_out=spare, **norms)
    assert torch.equal(buffer, kept)
    # views of one buffer that share no element: q in place, k into the spare heads
    q_rot, k_rot = rope(q.clone(), k.clone(), **norms)
    rope(q, k, q_out=q, k_out=spare, **norms)
    assert torch.equal(q, q_rot) and torch.equal(spare, k_rot) and torch.equal(buffer[:, :, 4:6], kept[:, :, 4:6])


def test_module_q_through_autograd_beside_k_into_the_cache():
    """q requiring grad beside k written into the cache (k_out=): q's rotation keeps its gradient, the cache gets
    k's rotation (only an input that requires grad and is written into an out is refused)."""
    rope = RotaryEmbedding(8, layout="b s h d", context_length=32)
    q, k = torch.randn(1, 3, 4, 8, requires_grad=True), torch.randn(1, 3, 2, 8)
    cache = torch.zeros(1, 5, 2, 8)
    q_rot, k_rot = rope(q, k, offset=2, k_out=cache[:, 2:])
    assert k_rot.data_ptr() == cache[:, 2:].data_ptr() and torch.equal(k_rot, rope(k, offset=2))
    q_rot.pow(2).sum().backward()
    expected = q.detach().clone().requires_grad_()
    rope(expected, offset=2).pow(2).sum().backward()
    assert torch.equal(q.grad, expected.grad)
    with pytest.raises(FlexRopeError, match="q_out= with q requiring grad"):
        rope(k.clone().requires_grad_(), q.detach(), k_offset=0, q_out=torch.empty(1, 3, 2, 8))
