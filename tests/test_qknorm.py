"""QK-norm fused with the rotation: against transformers' Qwen3 and Gemma 3 norm-then-rotate, gradients of
the unfused formula (gradcheck in float64, the weight too), partial and interleaved rotation, torch.compile
without a graph break, the module's q_norm / k_norm."""

import einops
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexrope
from flexrope import FlexRopeError, RotaryEmbedding, compute_rope
from flexrope.testing import laid_out, layouts

qwen3 = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")

D = 16


def _hf(norm_class, dtype):
    norm = norm_class(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    return norm.to(dtype)


def _unfused64(x, weight, offset, eps, cos, sin):
    """The definition in float64: RMSNorm over the head dim, times (offset + w), then the half-split rotation."""
    xf = x.double()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight.double())
    a, b = n.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


@pytest.mark.parametrize("norm_class, offset", [(qwen3.Qwen3RMSNorm, 0.0), (gemma3.Gemma3RMSNorm, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_norm_then_rotate(norm_class, offset, dtype):
    norm = _hf(norm_class, dtype)
    q = torch.randn(2, 3, 5, D).to(dtype)  # (b h s d), transformers' layout
    cos, sin = flexrope.precompute_rope_params(D, context_length=64)
    theirs, _ = qwen3.apply_rotary_pos_emb(norm(q), norm(q), cos[4:9].to(dtype)[None], sin[4:9].to(dtype)[None])
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    ours = compute_rope(q, cos, sin, "b h s d", offset=4, norm_weight=norm.weight, norm_eps=eps,
                        norm_weight_offset=offset)
    assert ours.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        return
    # bfloat16: ours is rounded once, theirs at every step; both within bfloat16's rounding of the definition
    half = D // 2  # seed-format tables repeat the r/2 angles
    exact = _unfused64(q, norm.weight, offset, eps, cos[4:9, :half].double(), sin[4:9, :half].double())
    unit = 2.0 ** -8 * exact.abs() * 1.001 + 1e-6  # bfloat16's unit roundoff, relative (float32 angles aside)
    assert ((ours.double() - exact).abs() <= unit).all()  # rounded once: within half an ulp
    # theirs rounds each product and sum in bfloat16: within a few roundings of the head's largest channel
    head_scale = 2.0 ** -8 * exact.abs().amax(-1, keepdim=True)
    assert ((ours.double() - theirs.double()).abs() <= 8 * head_scale).all()


@pytest.mark.parametrize("interleaved, rotary_dim", [(False, None), (False, 8), (True, 12)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_gradcheck_x_and_weight(interleaved, rotary_dim, offset):
    cos, sin = flexrope.precompute_rope_params(D, context_length=16, rotary_dim=rotary_dim, dtype=torch.float64)
    x = torch.randn(2, 3, 2, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[3, 0, 7], [1, 1, 2]])

    def fn(x, w):
        return compute_rope(x, cos, sin, "b s h d", positions=positions, interleaved=interleaved,
                            rotary_dim=rotary_dim, norm_weight=w, norm_eps=1e-5, norm_weight_offset=offset)

    assert torch.autograd.gradcheck(fn, (x, w))


def test_gradients_equal_unfused():
    cos, sin = flexrope.precompute_rope_params(D, context_length=16)
    x = torch.randn(2, 4, 3, D, requires_grad=True)
    norm = torch.nn.RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    grad = torch.randn(2, 4, 3, D)
    compute_rope(norm(x), cos, sin, "b s h d", offset=2).backward(grad)
    expected_x, expected_w = x.grad.clone(), norm.weight.grad.clone()
    x.grad = norm.weight.grad = None
    compute_rope(x, cos, sin, "b s h d", offset=2, norm_weight=norm.weight, norm_eps=1e-6).backward(grad)
    torch.testing.assert_close(x.grad, expected_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad, expected_w, rtol=1e-5, atol=1e-5)


def test_compiles_without_graph_break():
    cos, sin = flexrope.precompute_rope_params(D, context_length=16)
    x, w = torch.randn(1, 3, 2, D), torch.randn(D)

    @torch.compile(fullgraph=True, backend="eager")
    def fn(x, w):
        return compute_rope(x, cos, sin, "b s h d", offset=1, norm_weight=w, norm_eps=1e-6)

    # the C loop sums the squares in another order than torch: the last bit may differ
    torch.testing.assert_close(fn(x, w), compute_rope(x, cos, sin, "b s h d", offset=1, norm_weight=w,
                                                      norm_eps=1e-6), rtol=0, atol=1e-6)


@pytest.mark.parametrize("grad", [True, False])
def test_module_norms_compile_without_graph_break(grad):
    """The module's q_norm / k_norm under torch.compile(fullgraph=True), with and without gradients (the eager
    path remembers each norm by address and version, which a traced graph has not)."""
    rope = RotaryEmbedding(D, layout="b s h d", context_length=32)
    q_norm, k_norm = torch.nn.RMSNorm(D, eps=1e-6), _hf(gemma3.Gemma3RMSNorm, torch.float32)
    q, k = torch.randn(1, 4, 2, D), torch.randn(1, 4, 1, D)

    @torch.compile(fullgraph=True, backend="eager")
    def fn(q, k):
        return rope(q, k, offset=3, q_norm=q_norm, k_norm=k_norm)

    with torch.set_grad_enabled(grad):
        for got, expected in zip(fn(q, k), rope(q, k, offset=3, q_norm=q_norm, k_norm=k_norm)):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_module_q_norm_k_norm_into_the_cache():
    rope = RotaryEmbedding(D, layout="b s h d", context_length=32)
    q, k = torch.randn(2, 1, 4, D), torch.randn(2, 1, 2, D)
    q_norm, k_norm = _hf(qwen3.Qwen3RMSNorm, torch.float32), _hf(gemma3.Gemma3RMSNorm, torch.float32)
    cos, sin = flexrope.precompute_rope_params(D, context_length=32)
    q_expected = compute_rope(q_norm(q), cos, sin, "b s h d", offset=5)
    k_expected = compute_rope(k_norm(k), cos, sin, "b s h d", offset=5)
    cache_k = torch.zeros(2, 8, 2, D)
    with torch.no_grad():
        q_rot, k_rot = rope(q, k, offset=5, q_norm=q_norm, k_norm=k_norm, k_out=cache_k[:, 5:6])
    torch.testing.assert_close(q_rot, q_expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(cache_k[:, 5:6], k_expected, rtol=0, atol=1e-5)
    assert cache_k[:, :5].abs().sum() == 0


def test_module_norm_follows_changes_to_the_norm_between_calls():
    """The module remembers a norm's weight, eps and gain between calls; each way of changing them is seen: the
    weight edited in place, a new weight, new values under .data, a new eps, a Gemma norm's 1 + weight."""
    rope = RotaryEmbedding(D, layout="b s h d", context_length=32)
    cos, sin = flexrope.precompute_rope_params(D, context_length=32)
    q = torch.randn(1, 2, 3, D)
    norm = torch.nn.RMSNorm(D, eps=1e-6)

    def check(norm, offset=0.0):
        with torch.no_grad():
            got = rope(q, offset=3, q_norm=norm)
        expected = compute_rope(q, cos, sin, "b s h d", offset=3, norm_weight=norm.weight.detach(),
                                norm_eps=norm.eps, norm_weight_offset=offset)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    check(norm)
    with torch.no_grad():
        norm.weight.mul_(3.0)
    check(norm)
    norm.weight = torch.nn.Parameter(torch.rand(D) + 0.5)
    check(norm)
    norm.weight.data = torch.rand(D) - 2.0
    check(norm)
    norm.eps = 10.0  # large enough to change every value
    check(norm)
    norm.weight.data = torch.rand(D, dtype=torch.float64) + 0.5  # another dtype under the same Parameter
    check(norm)
    norm.weight.data = torch.rand(2 * D)  # another shape: refused, never read past the head dim
    with pytest.raises(FlexRopeError, match="q_norm_weight"), torch.no_grad():
        rope(q, offset=3, q_norm=norm)
    gemma = _hf(gemma3.Gemma3RMSNorm, torch.float32)
    check(gemma, offset=1.0)
    with torch.no_grad():
        gemma.weight.add_(1.0)
    check(gemma, offset=1.0)


def test_bad_norm_weight_is_refused():
    cos, sin = flexrope.precompute_rope_params(D, context_length=16)
    x = torch.randn(1, 3, 2, D)
    with pytest.raises(FlexRopeError, match=r"norm_weight is a torch.float32 tensor of shape \(8,\): expected"):
        compute_rope(x, cos, sin, "b s h d", norm_weight=torch.ones(8))
    with pytest.raises(FlexRopeError, match="norm_eps=-1"):
        compute_rope(x, cos, sin, "b s h d", norm_weight=torch.ones(D), norm_eps=-1)


@pytest.mark.parametrize("layout, shape", [("b s h d", (2, 5, 3, D)), ("b h s d", (2, 3, 5, D))])
@pytest.mark.parametrize("interleaved, rotary_dim", [(False, None), (True, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_pass_loop_equals_eager_math_into_a_cache(monkeypatch, layout, shape, interleaved, rotary_dim, dtype):
    """The C loop's norm and rotation (default on the CPU without a gradient) against the eager formula (the
    autograd path), through out= into a cache slice and with per-row positions."""
    cos, sin = flexrope.precompute_rope_params(D, context_length=32, rotary_dim=rotary_dim)
    x, w = torch.randn(shape, dtype=dtype), torch.randn(D, dtype=dtype)
    positions = torch.tensor([[3, 0, 7, 7, 2], [1, 1, 2, 9, 4]])
    kwargs = dict(positions=positions, interleaved=interleaved, rotary_dim=rotary_dim, norm_weight=w, norm_eps=1e-5,
                  norm_weight_offset=0.5)
    seq_dim = layout.split().index("s")
    cache = torch.zeros(*shape[:seq_dim], 9, *shape[seq_dim + 1:], dtype=dtype)
    into = cache.narrow(seq_dim, 2, 5)
    assert compute_rope(x, cos, sin, layout, out=into, **kwargs).data_ptr() == into.data_ptr()
    monkeypatch.setenv("FLEXROPE_BACKEND", "eager")
    expected = compute_rope(x, cos, sin, layout, **kwargs)
    tolerance = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(into, expected, rtol=tolerance, atol=tolerance)
    assert cache.narrow(seq_dim, 0, 2).abs().sum() == 0 and cache.narrow(seq_dim, 7, 2).abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim, rotary_dim", [(12, None), (20, None), (24, 16), (128, None), (136, 128)])
def test_one_pass_loop_every_dtype_and_head_dim(dtype, interleaved, head_dim, rotary_dim):
    """The C loop's norm in every dtype, for head dims past whole vectors of its sum (12, 20, 24: a tail of 4 or
    8), the unrolled 64 pairs of 128, pass-through channels, and rows that are not whole blocks of eight (11
    heads), against the definition in float64: within one rounding of a half-precision dtype, whose rounding
    at the end outweighs the float32 computation's; within the few roundings of that computation in float32."""
    cos, sin = flexrope.precompute_rope_params(head_dim, context_length=16, rotary_dim=rotary_dim)
    x = torch.randn(2, 3, 11, head_dim, dtype=torch.float64)
    w = torch.rand(head_dim, dtype=torch.float64) + 0.5
    positions = torch.tensor([[3, 0, 7], [1, 9, 4]])
    got = compute_rope(x.to(dtype), cos, sin, "b s h d", positions=positions, interleaved=interleaved,
                       rotary_dim=rotary_dim, norm_weight=w.to(dtype), norm_eps=1e-5)
    xd, wd = x.to(dtype).double(), w.to(dtype).double()
    n = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * wd
    expected = compute_rope(n, cos.double(), sin.double(), "b s h d", positions=positions, interleaved=interleaved,
                            rotary_dim=rotary_dim)
    eps = {torch.float32: 8 * 2 ** -23, torch.float64: 1e-12}.get(dtype, torch.finfo(dtype).eps)
    torch.testing.assert_close(got.double(), expected, rtol=eps, atol=eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_loop_shared_among_threads_equals_one_thread(dtype):
    """A call large enough for the loop's threads (at least 2^16 elements) gives the bits of the same call on one
    thread, rows at per-row positions written into a cache slice."""
    cos, sin = flexrope.precompute_rope_params(128, context_length=256)
    x, w = torch.randn(2, 70, 8, 128).to(dtype), (torch.rand(128) + 0.5).to(dtype)
    positions = torch.randint(0, 256, (2, 70))
    results, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            cache = torch.zeros(2, 80, 8, 128, dtype=dtype)
            compute_rope(x, cos, sin, "b s h d", positions=positions, norm_weight=w, out=cache[:, 5:75])
            results.append(cache)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    expected = compute_rope(x, cos, sin, "b s h d", positions=positions, norm_weight=w)
    assert torch.equal(results[0][:, 5:75], expected) and results[0][:, :5].abs().sum() == 0


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_one_pass_loop_reads_the_weight_in_its_own_dtype_and_strides(monkeypatch, x_dtype):
    """The loop reads the norm's weight where it is, in any of the four dtypes (converted to the compute dtype as
    torch converts it, then the offset added), and a strided weight through a copy made for the call: each
    against the eager formula."""
    cos, sin = flexrope.precompute_rope_params(16, context_length=32)
    x = torch.randn(2, 5, 3, 16).to(x_dtype)
    buffer = torch.rand(16, 2) + 0.5
    weights = [buffer[:, 0].contiguous().to(dtype) for dtype in (torch.float32, torch.float64, torch.bfloat16,
                                                                  torch.float16)] + [buffer[:, 0]]  # strided
    for weight in weights:
        kwargs = dict(offset=3, norm_weight=weight, norm_eps=1e-5, norm_weight_offset=1.0)
        monkeypatch.setenv("FLEXROPE_BACKEND", "auto")
        got = compute_rope(x, cos, sin, "b s h d", **kwargs)
        monkeypatch.setenv("FLEXROPE_BACKEND", "eager")
        expected = compute_rope(x, cos, sin, "b s h d", **kwargs)
        eps = torch.finfo(x_dtype).eps
        torch.testing.assert_close(got, expected, rtol=4 * eps, atol=4 * eps, msg=f"weight {weight.dtype}")


def _within_bfloat16_rounding(got: torch.Tensor, exact: torch.Tensor) -> bool:
    """got is exact rounded once to bfloat16 (with float32's own few roundings before it): within half an ulp,
    relative for normal numbers, absolute among the subnormals (an ulp of 2^-133 there)."""
    bound = 2.0 ** -8 * exact.abs() * 1.001 + 2.0 ** -134 * 1.01
    nan = exact.isnan()
    return torch.equal(got.isnan(), nan) and bool(((got.double() - exact).abs()[~nan] <= bound[~nan]).all())


@pytest.mark.parametrize("interleaved", [False, True])
def test_one_pass_loop_bfloat16_subnormal_results_tiny_rows_and_nan(interleaved):
    """Where the CPU rounds float32 to bfloat16 by its own instruction, which reads subnormal numbers as zero
    and sums squares by dot products that flush subnormal sums: results among bfloat16's subnormals (a row of
    one large channel and subnormal ones), a row whose squares are all float32 subnormals with eps 0 (its sum
    flushed would make its scale infinite), a row holding a NaN. Against the definition in float64."""
    cos, sin = flexrope.precompute_rope_params(128, context_length=16)
    generator = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (3, 9, 128), generator=generator).double() * 2 - 1
    x = torch.rand(3, 9, 128, generator=generator, dtype=torch.float64) + 0.5  # 9 heads: a block and one row
    x[0] = x[0] * 2.0 ** -131
    x[0, :, 0] = 1.0  # the other channels normalise to about 2^-131 * sqrt(128): subnormal results
    x[1] = x[1] * 2.0 ** -64  # squares about 2^-128: subnormal in float32
    x[2, 4, 3] = float("nan")
    x = (x * signs)[None].to(torch.bfloat16)  # (1, 3 tokens, 9 heads, 128)
    w = (torch.rand(128, generator=generator) + 0.5).to(torch.bfloat16)
    got = compute_rope(x, cos, sin, "b s h d", interleaved=interleaved, norm_weight=w, norm_eps=0.0)
    xd = x.double()
    n = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True)) * w.double()
    exact = compute_rope(n, cos.double(), sin.double(), "b s h d", interleaved=interleaved)
    assert (got[0, 0, :, 1:].double().abs() < 2.0 ** -126).any()  # results among the subnormals
    assert _within_bfloat16_rounding(got, exact)
    assert got[0, 2, 4].isnan().all() and not got[0, 2, :4].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 320])
def test_one_pass_loop_same_bits_whatever_the_layout(dtype, interleaved, head_dim):
    """The fused norm gives each row the same bits in "b s h d", where a token's heads share their angles (made
    once for them), as in "b h s d", where the angles change from row to row, and at positions or an offset;
    head dims of 32, 48, 64 and 160 pairs (past the most whose angles are made once: 128). Enough rows that a
    float32 result differing in its last bit would, somewhere, round to another bfloat16."""
    cos, sin = flexrope.precompute_rope_params(head_dim, context_length=64)
    x = torch.randn(2, 40, 11, head_dim).to(dtype)
    w = (torch.rand(head_dim) + 0.5).to(dtype)
    kwargs = dict(interleaved=interleaved, norm_weight=w, norm_eps=1e-6)
    by_token = compute_rope(x, cos, sin, "b s h d", offset=3, **kwargs)
    by_head = compute_rope(x.transpose(1, 2).contiguous(), cos, sin, "b h s d", offset=3, **kwargs)
    positioned = compute_rope(x, cos, sin, "b s h d", positions=torch.arange(3, 43).expand(2, 40), **kwargs)
    assert torch.equal(by_token, by_head.transpose(1, 2)) and torch.equal(by_token, positioned)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["b s h d", "b h s d"])
@pytest.mark.parametrize("tokens", [1, 70])  # 70 tokens of 8 query heads of 128: threaded (2^16 elements and up)
def test_module_q_and_k_in_one_call_of_the_loop_equal_each_alone(layout, dtype, tokens):
    """The module's fused q and k run as one call of the C loop (in bfloat16 "b s h d", a token's q heads then
    its k heads, its table row read once): the bits of each rotated alone by compute_rope, into a cache slice,
    with k at its own offset or positions (other table rows than q's), and with keys of more tokens than q."""
    rope = RotaryEmbedding(128, layout=layout, context_length=256, theta_base=1_000_000)
    shape = {"b s h d": lambda h, s: (2, s, h, 128), "b h s d": lambda h, s: (2, h, s, 128)}[layout]
    seq = layout.split().index("s")
    q, k = torch.randn(shape(8, tokens)).to(dtype), torch.randn(shape(2, tokens)).to(dtype)
    q_norm, k_norm = (torch.nn.RMSNorm(128, eps=1e-6).to(dtype) for _ in range(2))
    with torch.no_grad():
        q_norm.weight.uniform_(0.5, 1.5), k_norm.weight.uniform_(0.5, 1.5)
    cache = torch.zeros(shape(2, tokens + 9), dtype=dtype)
    k_out = cache.narrow(seq, 9, tokens)
    cases = [dict(offset=3), dict(offset=3, k_offset=40), dict(positions=torch.randint(0, 200, (2, tokens)))]
    with torch.no_grad():
        for where in cases:
            q_rot, k_rot = rope(q, k, q_norm=q_norm, k_norm=k_norm, k_out=k_out, **where)
            q_where = {"offset": where.get("offset", 0), "positions": where.get("positions")}
            k_where = {"offset": where.get("k_offset", q_where["offset"]), "positions": where.get("positions")}
            for got, x, norm, place in ((q_rot, q, q_norm, q_where), (k_rot, k, k_norm, k_where)):
                alone = compute_rope(x, rope.cos, rope.sin, layout, norm_weight=norm.weight, norm_eps=1e-6, **place)
                assert torch.equal(got, alone), where
            assert k_rot is k_out and cache.narrow(seq, 0, 9).abs().sum() == 0
        keys = torch.randn(shape(2, tokens + 9)).to(dtype)  # the whole cache's keys: other units than q's
        q_rot, k_rot = rope(q, keys, offset=9, k_offset=0, q_norm=q_norm, k_norm=k_norm)
        assert torch.equal(k_rot, compute_rope(keys, rope.cos, rope.sin, layout, norm_weight=k_norm.weight,
                                               norm_eps=1e-6))


@settings(max_examples=300)  # small tensors: 300 in about 3 s, enough to reach the loop's common unit
@given(text=layouts(), head_dim=st.sampled_from([8, 128]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       interleaved=st.booleans(), per_row=st.booleans(), start=st.none() | st.integers(0, 20), data=st.data())
def test_fused_norm_in_any_layout_has_the_bits_of_the_canonical_view(text, head_dim, dtype, interleaved, per_row,
                                                                   start, data):
    """Law: the C loop's norm and rotation of x in any layout whose channels are innermost in memory are, bit for
    bit, those of the same values laid out canonically ("b h s d", contiguous), laid out back (other layouts go
    through torch's operations: within their roundings); and within a few roundings of the float64 definition.
    Head dim 128 reaches the loop's common unit where a token's heads sit together in memory."""
    case = data.draw(laid_out(text, d=head_dim, dtype=dtype))
    canonical = case.canonical
    b, s = canonical.shape[-4], canonical.shape[-2]
    cos, sin = flexrope.precompute_rope_params(head_dim, context_length=32)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    positions = torch.randint(0, 26, (b, s) if per_row else (s,), generator=generator)
    where = dict(positions=positions) if start is None else dict(offset=start)
    w = (torch.rand(head_dim, generator=generator) + 0.5).to(dtype)
    kwargs = dict(interleaved=interleaved, norm_weight=w, norm_eps=1e-6, **where)
    got = compute_rope(case.x, cos, sin, text, **kwargs, **case.lengths)
    lead = "... " if canonical.ndim > 4 else ""
    expected = compute_rope(canonical.contiguous(), cos, sin, lead + "b h s d", **kwargs)
    tolerance = 8 * 2.0 ** -23 if dtype == torch.float32 else 2.0 ** -8
    laid_back = einops.rearrange(expected, case.pattern, **case.lengths)
    if text.replace(")", " ").split()[-1] == "d":  # the channels innermost: the C loop, both ways
        assert torch.equal(got, laid_back)
    else:
        torch.testing.assert_close(got, laid_back, rtol=tolerance, atol=tolerance)
    xd, wd = canonical.double(), w.double()
    n = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * wd
    exact = compute_rope(n, cos.double(), sin.double(), lead + "b h s d", interleaved=interleaved, **where)
    torch.testing.assert_close(expected.double(), exact, rtol=tolerance, atol=tolerance)


def test_module_fused_call_follows_its_tables_and_pickles():
    """The fused CPU call reads half-width copies of the module's tables, made on first use: a change to the
    tables in place, or new tables, is seen at the next call (the same bits as compute_rope on the tables), and the
    module still pickles and deep-copies after such a call."""
    import copy
    import pickle

    rope = RotaryEmbedding(128, layout="b s h d", context_length=64)
    q, k = torch.randn(1, 6, 4, 128), torch.randn(1, 6, 2, 128)
    norm = torch.nn.RMSNorm(128, eps=1e-6)

    def check():
        q_rot, k_rot = rope(q, k, offset=3, q_norm=norm, k_norm=norm)
        for got, x in ((q_rot, q), (k_rot, k)):
            assert torch.equal(got, compute_rope(x, rope.cos, rope.sin, "b s h d", offset=3, norm_weight=norm.weight,
                                                 norm_eps=1e-6))

    with torch.no_grad():
        check()
        rope.cos.mul_(0.5), rope.sin.mul_(0.5)  # in place: the versions move
        check()
        rope.cos, rope.sin = rope.cos * 2, rope.sin * 2  # new tensors
        check()
    assert torch.equal(pickle.loads(pickle.dumps(rope)).cos, rope.cos)
    assert torch.equal(copy.deepcopy(rope).sin, rope.sin)


def test_module_fused_call_under_a_dispatch_mode_makes_no_table_copies():
    """Under a dispatch mode (a fake-tensor or flop-counting one) the fused call takes the eager path, which the mode
    sees: no half-width copies of the tables are made there (the mode would see them made, or wrap them, and they
    would be kept)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    rope = RotaryEmbedding(128, layout="b s h d", context_length=64)
    q, k = torch.randn(1, 4, 4, 128), torch.randn(1, 4, 2, 128)
    norm = torch.nn.RMSNorm(128, eps=1e-6)
    with torch.no_grad():
        expected = rope(q, k, q_norm=norm, k_norm=norm)
        rope._halves.clear()
        with FlopCounterMode(display=False):
            counted = rope(q, k, q_norm=norm, k_norm=norm)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = rope(mode.from_tensor(q), mode.from_tensor(k), q_norm=norm, k_norm=norm)
        assert not rope._halves
        for got, want in zip(counted, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert [tuple(t.shape) for t in fake] == [tuple(q.shape), tuple(k.shape)]


@pytest.mark.parametrize("grad", [True, False])
def test_module_checks_both_norms_before_anything_is_written(grad):
    """A bad k_norm (or one whose weight requires grad, beside k_out=) is refused before q's rotation is written
    into q_out, with or without gradients enabled."""
    rope = RotaryEmbedding(8, layout="b s h d", context_length=32)
    q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 2, 8)
    q_out, k_out = torch.zeros_like(q), torch.zeros_like(k)
    good = (torch.ones(8), 1e-6, 0.0)
    with torch.set_grad_enabled(grad):
        with pytest.raises(FlexRopeError, match="k_norm_weight"):
            rope(q, k, q_out=q_out, k_out=k_out, q_norm=good, k_norm=(torch.ones(7), 1e-6, 0.0))
        if grad:
            with pytest.raises(FlexRopeError, match="k_out= with k_norm's weight requiring grad"):
                rope(q, k, q_out=q_out, k_out=k_out, q_norm=good, k_norm=torch.nn.RMSNorm(8))
            with pytest.raises(FlexRopeError, match="k_out= with k requiring grad"):
                rope(q, k.clone().requires_grad_(), q_out=q_out, k_out=k_out, q_norm=good)
    assert q_out.abs().sum() == 0 and k_out.abs().sum() == 0


def test_norm_weight_requiring_grad_with_out_index_is_refused():
    """out= (with out_index= or not) and a norm weight that requires grad: refused, as with x requiring grad
    (the caller's cache would join the autograd graph)."""
    cos, sin = flexrope.precompute_rope_params(8, context_length=16)
    x, cache = torch.randn(1, 3, 2, 8), torch.zeros(1, 5, 2, 8)
    w = torch.ones(8, requires_grad=True)
    for index in (None, torch.tensor([0, 2, 4])):
        out = cache if index is not None else cache[:, :3]
        with pytest.raises(FlexRopeError, match="out= with norm_weight requiring grad"):
            compute_rope(x, cos, sin, "b s h d", norm_weight=w, out=out, out_index=index)
    assert cache.abs().sum() == 0 and not cache.requires_grad


def _model_norm(module, name):
    return getattr(pytest.importorskip(f"transformers.models.{module}.modeling_{module}"), name)


# (module, class, scales by 1 + weight): names alone do not tell (Gemma 3n's and Gemma 4's scale by weight,
# Qwen3-Next's and T5Gemma 2's by 1 + weight)
MODEL_NORMS = [("qwen3", "Qwen3RMSNorm", False), ("gemma3", "Gemma3RMSNorm", True),
               ("gemma3n", "Gemma3nRMSNorm", False), ("gemma4", "Gemma4RMSNorm", False),
               ("qwen3_next", "Qwen3NextRMSNorm", True), ("t5gemma2", "T5Gemma2RMSNorm", True),
               ("olmo2", "Olmo2RMSNorm", False)]


@pytest.mark.parametrize("module, name, one_plus", MODEL_NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_norms_are_told_apart_by_what_they_compute(module, name, one_plus, dtype):
    """Each model's own q_norm, fused, equals that norm then the rotation, whatever its class is called."""
    norm = _hf(_model_norm(module, name), dtype)
    rope = RotaryEmbedding(D, layout="b s h d", context_length=32)
    cos, sin = flexrope.precompute_rope_params(D, context_length=32)
    q = torch.randn(2, 3, 4, D).to(dtype)
    with torch.no_grad():
        ours = rope(q, offset=2, q_norm=norm)
        theirs = compute_rope(norm(q), cos, sin, "b s h d", offset=2)
        exact = _unfused64(q, norm.weight, 1.0 if one_plus else 0.0, 1e-6, *(
            t[2:5, :D // 2].double()[None, :, None] for t in (cos, sin)))
    if dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    else:  # rounded once: within bfloat16's half ulp of the definition; theirs within a few roundings of ours
        assert ((ours.double() - exact).abs() <= 2.0 ** -8 * exact.abs() * 1.001 + 1e-6).all()
        head_scale = 2.0 ** -8 * exact.abs().amax(-1, keepdim=True)
        assert ((ours.double() - theirs.double()).abs() <= 8 * head_scale).all()


class _EpsElsewhere(torch.nn.Module):
    """An RMSNorm whose .eps says 1e-6 while its forward uses 1e-2."""

    def __init__(self):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.rand(D) + 0.5), 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-2) * self.weight


@pytest.mark.parametrize("make, match", [
    (lambda: torch.nn.LayerNorm(D, eps=1e-6), "fits neither"),
    (lambda: _model_norm("cohere", "CohereLayerNorm")(D, eps=1e-6), "fits neither"),
    (_EpsElsewhere, "fits neither"),
    (lambda: torch.nn.RMSNorm(D, elementwise_affine=False), r"without a weight .*torch.ones\(16\)"),
    (lambda: torch.nn.Identity(), "expected an RMSNorm module"),
])
def test_norms_that_are_not_an_rmsnorm_of_their_eps_are_refused_with_nothing_written(make, match):
    rope = RotaryEmbedding(D, layout="b s h d", context_length=32)
    q, k = torch.randn(1, 3, 2, D), torch.randn(1, 3, 1, D)
    q_out, cache = torch.zeros_like(q), torch.zeros(1, 8, 1, D)
    with pytest.raises(FlexRopeError, match=match), torch.no_grad():
        rope(q, k, offset=1, q_norm=torch.nn.RMSNorm(D, eps=1e-6), k_norm=make(), q_out=q_out,
             k_out=cache[:, 1:4])
    assert not q_out.any() and not cache.any()


def test_a_fresh_norm_is_probed_while_compiling():
    """Gemma 4's norm (scales by weight) and Qwen3-Next's (by 1 + weight), first seen inside
    torch.compile(fullgraph=True): the probe runs while tracing, without a graph break."""
    rope = RotaryEmbedding(D, layout="b s h d", context_length=32)
    q_norm = _hf(_model_norm("gemma4", "Gemma4RMSNorm"), torch.float32)
    k_norm = _hf(_model_norm("qwen3_next", "Qwen3NextRMSNorm"), torch.float32)
    q, k = torch.randn(1, 4, 2, D), torch.randn(1, 4, 1, D)

    @torch.compile(fullgraph=True, backend="eager")
    def fn(q, k):
        return rope(q, k, offset=3, q_norm=q_norm, k_norm=k_norm)

    cos, sin = flexrope.precompute_rope_params(D, context_length=32)
    with torch.no_grad():
        got = fn(q, k)
        expected = [compute_rope(n(x), cos, sin, "b s h d", offset=3) for n, x in ((q_norm, q), (k_norm, k))]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


def test_every_q_norm_of_the_installed_transformers_is_matched_or_refused():
    """Every class a transformers model builds its ``self.q_norm`` from (found in the installed models' source),
    fused, equals that norm then the rotation, or is refused (its LayerNorms): never a wrong number."""
    import glob
    import importlib
    import os
    import re

    import transformers

    root = os.path.dirname(transformers.__file__)
    rope = RotaryEmbedding(D, layout="b s h d", context_length=32)
    cos, sin = flexrope.precompute_rope_params(D, context_length=32)
    matched, refused = [], []
    for path in sorted(glob.glob(f"{root}/models/*/modeling_*.py")):
        with open(path) as source:
            names = set(re.findall(r"self\.q_norm = (\w+)\(", source.read()))
        if not names:
            continue
        try:
            module = importlib.import_module("transformers." + os.path.relpath(path, root)[:-3].replace(os.sep, "."))
        except ImportError:  # a model needing a package the tests do not install
            continue
        for name in sorted(names):
            try:
                norm = getattr(module, name)(D, eps=1e-6)
            except (TypeError, AttributeError):  # built from a config or not a class of (dim, eps)
                continue
            if not isinstance(getattr(norm, "weight", None), torch.Tensor):  # no gain: refused, as tested above
                continue
            with torch.no_grad():
                norm.weight.normal_(0.2, 0.5)
            q = torch.randn(1, 3, 2, D)
            try:
                with torch.no_grad():
                    ours = rope(q, offset=2, q_norm=norm)
            except FlexRopeError as error:
                assert "fits neither" in str(error), name
                refused.append(name)
                continue
            with torch.no_grad():
                theirs = compute_rope(norm(q), cos, sin, "b s h d", offset=2)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=name)
            matched.append(name)
    assert len(matched) >= 10 and "Qwen3RMSNorm" in matched and "Gemma3RMSNorm" in matched, matched
