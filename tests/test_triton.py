"""The Triton backend against the eager one: every layout, both pairings, positions, in place, backward, q and k
in one launch, positions checked without reading a value on the host.

Without a GPU these run the kernels in Triton's interpreter on CPU tensors (small shapes: it is slow). The
interpreter's own float32 -> bfloat16 cast truncates, so under it the kernel rounds to nearest even itself;
with that, every comparison here is bitwise.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import flexrope
from flexrope import FlexRopeError, RotaryEmbedding, compute_rope

from flexrope.testing import layout_cases

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _backend(monkeypatch, name):
    monkeypatch.setenv("FLEXROPE_BACKEND", name)


def _both(monkeypatch, fn):
    """fn() through the Triton backend and through the eager one."""
    _backend(monkeypatch, "triton")
    fast = fn()
    _backend(monkeypatch, "eager")
    slow = fn()
    _backend(monkeypatch, "triton")
    return fast, slow


def _tables(head_dim=8, rotary_dim=None, dtype=torch.float32):
    cos, sin = flexrope.precompute_rope_params(head_dim, context_length=32, rotary_dim=rotary_dim, dtype=dtype)
    return cos.to(DEVICE), sin.to(DEVICE)


@settings(max_examples=25)
@given(case=layout_cases(), interleaved=st.booleans(), partial=st.booleans(), per_row=st.booleans(), data=st.data())
def test_every_layout_equals_eager_bitwise(case, interleaved, partial, per_row, data):
    with pytest.MonkeyPatch.context() as patch:  # per example: the backend it sets never reaches the next test
        _every_layout_case(patch, case, interleaved, partial, per_row, data)


def _every_layout_case(patch, case, interleaved, partial, per_row, data):
    text, lengths, canonical, x, _ = case
    d = canonical.shape[-1]
    rotary_dim = d - 2 if partial and d > 2 else None
    cos, sin = _tables(d, rotary_dim)
    x = x.to(DEVICE)
    b, s = canonical.shape[-4], canonical.shape[-2]
    seed = data.draw(st.integers(0, 1000))
    positions = torch.randint(0, 32 - 6, (b, s) if per_row else (s,), generator=torch.Generator().manual_seed(seed))
    kwargs = dict(interleaved=interleaved, rotary_dim=rotary_dim, positions=positions.to(DEVICE), **lengths)
    fast, slow = _both(patch, lambda: compute_rope(x, cos, sin, text, **kwargs))
    assert torch.equal(fast, slow) and fast.stride() == slow.stride()
    inplace = x.clone()
    _backend(patch, "triton")
    assert compute_rope(inplace, cos, sin, text, inplace=True, **kwargs) is inplace
    assert torch.equal(inplace, slow)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["b h s d", "b s h d", "s b h d"])
def test_dtypes_and_offsets_equal_eager_bitwise(monkeypatch, dtype, interleaved, layout):
    cos, sin = _tables(16, rotary_dim=12)
    shape = {"b h s d": (2, 3, 5, 16), "b s h d": (2, 5, 3, 16), "s b h d": (5, 2, 3, 16)}[layout]
    x = torch.randn(shape).to(dtype).to(DEVICE)
    for offset in (7, torch.tensor([3, 11], device=DEVICE), torch.tensor([3, 11], dtype=torch.uint8, device=DEVICE)):
        kwargs = dict(interleaved=interleaved, rotary_dim=12, offset=offset)
        fast, slow = _both(monkeypatch, lambda: compute_rope(x, cos, sin, layout, **kwargs))
        assert torch.equal(fast, slow)


def test_strided_and_ellipsis_inputs(monkeypatch):
    cos, sin = _tables(8)
    sliced = torch.randn(2, 3, 5, 16, device=DEVICE)[..., ::2]  # channels of stride 2
    lead = torch.randn(3, 2, 4, 2, 5, 8, device=DEVICE).permute(1, 0, 2, 3, 4, 5)  # lead axes with no one stride
    for x, layout in ((sliced, "b h s d"), (lead, "... b h s d"), (torch.randn(5, 24, device=DEVICE), "s (h d)")):
        fast, slow = _both(monkeypatch, lambda: compute_rope(x, cos, sin, layout, offset=2, d=8) if "(h d)" in layout
                           else compute_rope(x, cos, sin, layout, offset=2))
        assert torch.equal(fast, slow)


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck(monkeypatch, interleaved):
    """gradcheck on a few elements (each is two launches in the interpreter), then the kernel's vector-Jacobian
    product on more rows and heads against the eager backend's (gradchecked on its own)."""
    _backend(monkeypatch, "triton")
    cos, sin = _tables(8, rotary_dim=6, dtype=torch.float64)

    def fn(x, positions):
        return compute_rope(x, cos, sin, "b s h d", positions=positions, interleaved=interleaved, rotary_dim=6)

    x = torch.randn(1, 2, 2, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fn(x, torch.tensor([4, 9], device=DEVICE)), (x,))
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    positions, grad = torch.tensor([4, 0, 9, 2, 2], device=DEVICE), torch.randn(2, 5, 3, 8, dtype=torch.float64)
    (kernel,) = torch.autograd.grad(fn(x, positions), x, grad.to(DEVICE))
    _backend(monkeypatch, "eager")
    (eager,) = torch.autograd.grad(fn(x, positions), x, grad.to(DEVICE))
    torch.testing.assert_close(kernel, eager, rtol=0, atol=1e-12)


def test_module_rotates_q_and_k_of_other_head_counts_in_one_launch(monkeypatch):
    rope = RotaryEmbedding(8, layout="b s h d", context_length=32).to(DEVICE)
    q = torch.randn(2, 5, 4, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 9, 1, 8, device=DEVICE, requires_grad=True)
    launches = []
    from flexrope import _triton

    real = _triton.launch
    monkeypatch.setattr(_triton, "launch", lambda operands, *a, **kw: launches.append(len(operands)) or real(
        operands, *a, **kw))

    def fn():
        (q2, k2) = rope(q, k, offset=torch.tensor([1, 6], device=DEVICE), k_offset=0)
        grads = torch.autograd.grad((q2 * 2).sum() + (k2 * 3).sum(), (q, k))
        return q2, k2, *grads

    fast, slow = _both(monkeypatch, fn)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))
    assert launches == [2, 2]  # forward and backward: q and k together


@pytest.mark.parametrize("kwargs", [
    dict(positions=torch.tensor([0, 1, 32, 3, 4])),
    dict(positions=torch.tensor([0, 1, -1, 3, 4])),
    dict(offset=torch.tensor([0, 28])),
])
@pytest.mark.skipif(DEVICE == "cuda",
                    reason="on CUDA a bad position is a device-side assert (benchmarks/bench_gpu.py checks it)")
def test_bad_positions_are_errors_and_the_next_call_works(monkeypatch, kwargs):
    _backend(monkeypatch, "triton")
    cos, sin = _tables(8)
    x = torch.randn(2, 3, 5, 8)
    with pytest.raises(FlexRopeError, match="positions hold a position < 0 or >= the table's 32 positions"):
        compute_rope(x, cos, sin, **kwargs)
    assert torch.equal(compute_rope(x, cos, sin, offset=1), compute_rope(x, cos, sin, positions=torch.arange(1, 6)))


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_reads_no_tensor_value_on_the_host(monkeypatch):
    _backend(monkeypatch, "triton")
    cos, sin = _tables(8)
    rope = RotaryEmbedding(8, layout="b s h d", context_length=32).to(DEVICE)
    x = torch.randn(2, 5, 3, 8, device=DEVICE)
    positions = torch.randint(0, 32, (2, 5), device=DEVICE)
    with _HostReads() as mode:
        compute_rope(x, cos, sin, "b s h d", positions=positions)
        compute_rope(x, cos, sin, "b s h d", offset=torch.tensor([2, 9], device=DEVICE))
        rope(x, x[:, :, :1], positions=positions)
    assert mode.ops and not [op for op in mode.ops if "_local_scalar_dense" in op or "item" in op]


def test_forced_triton_backend_on_a_device_it_cannot_run(monkeypatch):
    _backend(monkeypatch, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cos, sin = flexrope.precompute_rope_params(8, context_length=32)
    if DEVICE == "cpu":
        with pytest.raises(FlexRopeError, match="FLEXROPE_BACKEND=triton with x on cpu"):
            compute_rope(torch.randn(1, 2, 3, 8), cos, sin)
    _backend(monkeypatch, "fast")
    with pytest.raises(FlexRopeError,
                       match="FLEXROPE_BACKEND='fast': expected one of auto, triton, native, compiled, eager"):
        compute_rope(torch.randn(1, 2, 3, 8), cos, sin)


def test_operator_for_compiled_graphs_passes_opcheck():
    """The operator a caller's torch.compile graph calls: schema, fake (meta) implementation, autograd
    registration, all as torch.library.opcheck checks them."""
    from flexrope import _triton

    cos, sin = _tables(8, rotary_dim=6)
    x = torch.randn(2, 5, 3, 8, device=DEVICE).permute(0, 2, 1, 3)  # canonical view of (b s h d)
    positions = torch.randint(0, 32, (2, 5), device=DEVICE)
    for args in ((x, cos, sin, None, 4, _triton.START, 6, True, False),
                 (x, cos, sin, positions, 0, _triton.POSITIONS, 6, False, True)):
        torch.library.opcheck(_triton.rotate_op, args)
        out, ok = _triton.rotate_op(*args)
        assert out.stride() == x.stride() and ok.item() == 1


def test_inverse_equals_eager_bitwise_and_its_gradient(monkeypatch):
    cos, sin = _tables(8)
    x = torch.randn(2, 5, 3, 8, device=DEVICE, requires_grad=True)
    positions = torch.tensor([1, 4, 9, 0, 31], device=DEVICE)

    def fn():
        y = compute_rope(x, cos, sin, "b s h d", positions=positions, inverse=True)
        return y, *torch.autograd.grad((y * y.detach()).sum(), x)

    fast, slow = _both(monkeypatch, fn)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def test_per_token_tables_equal_eager_bitwise(monkeypatch):
    cos, sin = _tables(8)
    x = torch.randn(2, 5, 3, 8, device=DEVICE)
    positions = torch.tensor([[1, 4, 9, 0, 31], [2, 2, 7, 8, 30]], device=DEVICE)
    per_token_cos, per_token_sin = cos[positions], sin[positions]  # (b, s, r)
    fast, slow = _both(monkeypatch, lambda: compute_rope(x, per_token_cos, per_token_sin, "b s h d"))
    assert torch.equal(fast, slow)
    assert torch.equal(fast, compute_rope(x, cos, sin, "b s h d", positions=positions))


def test_multi_axis_module_equals_eager_bitwise(monkeypatch):
    rope = flexrope.MultiAxisRotaryEmbedding(16, axes={"f": 2, "y": 3, "x": 3}, layout="b (f y x) h d",
                                             frequencies="per_axis").to(DEVICE)
    q, k = torch.randn(2, 12, 4, 16, device=DEVICE), torch.randn(2, 12, 1, 16, device=DEVICE)
    fast, slow = _both(monkeypatch, lambda: rope(q, k, f=2, y=3, x=2))
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def test_in_place_write_is_seen_by_autograd(monkeypatch):
    """The kernel writes through a pointer; x's version still moves, so a tensor saved for backward that it
    overwrote is an error, as with the eager kernels."""
    _backend(monkeypatch, "triton")
    cos, sin = _tables()
    weight = torch.randn(1, 2, 5, 8, device=DEVICE, requires_grad=True)
    y = torch.randn(1, 2, 5, 8, device=DEVICE)
    saved = weight * y  # saves y for weight's gradient; y itself needs none
    compute_rope(y, cos, sin, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


def test_tables_of_different_strides_and_a_repeated_geometry(monkeypatch):
    """sin laid out unlike cos (the launch copies both to shared strides), and the same geometry called again
    at other positions (its cached plan, new starts and positions)."""
    cos, sin = _tables(16)
    sin_wide = torch.zeros(sin.shape[0], 2 * sin.shape[1], device=DEVICE)
    sin_wide[:, ::2] = sin
    odd_sin = sin_wide[:, ::2]  # the same values, column stride 2
    x = torch.randn(2, 5, 3, 16, device=DEVICE)
    for offset in (0, 9, torch.tensor([4, 11], device=DEVICE)):
        fast, slow = _both(monkeypatch, lambda: compute_rope(x, cos, odd_sin, "b s h d", offset=offset))
        assert torch.equal(fast, slow)
        assert torch.equal(fast, compute_rope(x, cos, sin, "b s h d", offset=offset))


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_offsets_past_two_to_the_31_elements(monkeypatch, backend):
    """A view whose tokens lie 2^30 elements apart: the third token is 2^31 elements past the first, which an
    int32 offset cannot reach (the kernel's offsets wrapped, and it wrote outside x). Only the pages of the
    three tokens are touched; the 4 GB of storage are address space."""
    if backend == "native" and DEVICE != "cpu":
        pytest.skip("the C loop runs CPU tensors")
    try:
        storage = torch.empty(2**31 + 16, dtype=torch.float16, device=DEVICE)
    except RuntimeError as error:  # a machine that cannot reserve the address space
        pytest.skip(f"no 4 GB of storage: {error}")
    x = storage.as_strided((1, 1, 3, 8), (0, 0, 2**30, 1))
    x.copy_(torch.randn(1, 1, 3, 8, generator=torch.Generator().manual_seed(0)).half())
    cos, sin = _tables()
    _backend(monkeypatch, "eager")
    expected = compute_rope(x, cos, sin, offset=1)
    _backend(monkeypatch, backend)
    assert torch.equal(compute_rope(x, cos, sin, offset=1), expected)
    assert compute_rope(x, cos, sin, offset=1, inplace=True) is x and torch.equal(x, expected)


def test_channel_offsets_past_two_to_the_31_elements(monkeypatch):
    """Channels 2^30 elements apart (the channels outermost in a huge tensor): offsets of the fourth channel
    reach 3 * 2^30, computed in int64 (only pages of the touched elements are used)."""
    try:
        storage = torch.empty(3 * 2**30 + 16, dtype=torch.float16, device=DEVICE)
    except RuntimeError as error:
        pytest.skip(f"no 6 GB of storage: {error}")
    x = storage.as_strided((1, 1, 2, 4), (0, 0, 1, 2**30))
    x.copy_(torch.randn(1, 1, 2, 4, generator=torch.Generator().manual_seed(0)).half())
    cos, sin = _tables(4)
    fast, slow = _both(monkeypatch, lambda: compute_rope(x, cos, sin, offset=1))
    assert torch.equal(fast, slow)


def test_programs_of_many_token_and_head_blocks(monkeypatch):
    """Blocks of two elements' worth: q and k (other lengths and head counts) each cut into many blocks of
    tokens and of heads, the token blocks and batch rows sharing the grid's first axis."""
    from flexrope import _triton

    monkeypatch.setattr(_triton, "ELEMENTS_PER_PROGRAM", 16)
    monkeypatch.setattr(_triton, "HEADS_PER_PROGRAM", 1)
    monkeypatch.setattr(_triton, "_plans", {})
    _triton._blocks.cache_clear()
    try:
        rope = RotaryEmbedding(8, layout="b s h d", context_length=32).to(DEVICE)
        q, k = torch.randn(3, 7, 5, 8, device=DEVICE), torch.randn(3, 11, 2, 8, device=DEVICE)
        fast, slow = _both(monkeypatch, lambda: rope(q, k, offset=torch.tensor([1, 6, 9], device=DEVICE), k_offset=2))
        assert _triton._blocks(4, 5, 11, False)[:2] == (1, 2)  # 11 token blocks, 3 head blocks for q, 1 for k
    finally:
        _triton._blocks.cache_clear()
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def test_a_batch_of_more_rows_than_a_grid_axis_of_65535(monkeypatch):
    """70,000 rows (windows of a batch of images, say): the grid's second axis, which CUDA limits to 65535,
    holds head blocks only; the rows go along the first, with the token blocks."""
    from flexrope import _triton

    grids = []

    class Recorded:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(_triton, "_rope_one", Recorded())
    monkeypatch.setattr(_triton, "_plans", {})
    _backend(monkeypatch, "triton")
    cos, sin = _tables()
    compute_rope(torch.zeros(70_000, 2, 3, 8, device=DEVICE), cos, sin, "b h s d")
    (grid,) = grids
    assert grid == (70_000, 1) and max(grid[1:]) <= 65535


@pytest.mark.parametrize("interleaved", [False, True])
def test_positions_of_one_row_shared_by_a_batch(monkeypatch, interleaved):
    """Positions (1, s) with a batch of 3: every row reads the one row of positions (its batch stride is 0),
    not the rows past it; as (s,) positions and as the eager backend give it."""
    cos, sin = _tables(8, rotary_dim=6)
    x = torch.randn(3, 5, 2, 8, device=DEVICE)
    row = torch.tensor([[4, 0, 9, 2, 31]], device=DEVICE)
    padded = torch.tensor([[4, 0, 9, 2, 31], [7, 7, 7, 7, 7], [1, 1, 1, 1, 1]], device=DEVICE)[:1]  # rows behind it
    for positions in (row, padded):
        kwargs = dict(positions=positions, interleaved=interleaved, rotary_dim=6)
        fast, slow = _both(monkeypatch, lambda: compute_rope(x, cos, sin, "b s h d", **kwargs))
        assert torch.equal(fast, slow)
        assert torch.equal(fast, compute_rope(x, cos, sin, "b s h d", positions=positions[0], interleaved=interleaved,
                                              rotary_dim=6))
        y = x.clone()
        compute_rope(y, cos, sin, "b s h d", inplace=True, **kwargs)
        assert torch.equal(y, slow)


@pytest.mark.parametrize("interleaved", [False, True])
def test_bfloat16_results_at_midpoints_round_to_even(monkeypatch, interleaved):
    """x = 1, cos = v and sin = 0: each result is v - 0 or v + 0 in float32, v halfway between two bfloat16
    numbers (with an even and with an odd last bit below it), and one float32 ulp either side: rounded as
    torch's own float32 -> bfloat16 conversion rounds them (to nearest, ties to even)."""
    _backend(monkeypatch, "triton")
    below = torch.tensor([1.0, 1.0078125, 3.0, -2.5, 1e-3, 7e5, -6e-30, 2.0**100]).bfloat16().float()
    step = below.view(torch.int32) + (1 << 16)
    midpoints = ((below.double() + step.view(torch.float32).double()) / 2).float()
    assert torch.equal(midpoints.bfloat16().view(torch.int16) & 1, torch.zeros(8, dtype=torch.int16))  # ties: even
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    values = torch.cat([midpoints, midpoints.nextafter(up), midpoints.nextafter(down), below]).view(-1, 4)
    zero = torch.zeros_like(values)
    x = torch.ones(1, 1, values.shape[0], 8, dtype=torch.bfloat16, device=DEVICE)
    out = compute_rope(x, values.to(DEVICE), zero.to(DEVICE), rotary_dim=8, interleaved=interleaved)[0, 0].cpu()
    first, second = (out[:, 0::2], out[:, 1::2]) if interleaved else (out[:, :4], out[:, 4:])
    assert torch.equal(first.view(torch.int16), (values - zero).bfloat16().view(torch.int16))
    assert torch.equal(second.view(torch.int16), (values + zero).bfloat16().view(torch.int16))


def test_sin_strided_unlike_cos(monkeypatch):
    """cos contiguous and sin column-major or every other row of a longer table (and the other way round):
    the kernel reads both through one set of strides, so they are copied alike first."""
    cos, sin = _tables(8)
    strided = (lambda t: t.t().contiguous().t(), lambda t: torch.stack([t, torch.randn_like(t)], 1).flatten(0, 1)[::2])
    x = torch.randn(2, 3, 5, 8, device=DEVICE)
    for where in (dict(offset=3), dict(positions=torch.tensor([[4, 0, 9, 2, 31], [1, 2, 3, 4, 5]], device=DEVICE))):
        want = _both(monkeypatch, lambda: compute_rope(x, cos, sin, **where))[1]
        for view in strided:
            for tables in ((cos, view(sin)), (view(cos), sin)):
                fast, slow = _both(monkeypatch, lambda: compute_rope(x, *tables, **where))
                assert torch.equal(fast, slow) and torch.equal(fast, want)


def test_lead_axes_of_length_one_with_any_stride(monkeypatch):
    """Lead axes ("...") of length 1 carry strides that say nothing (x of (2, 1, d, s) in "... d s" gives its
    unit axis the stride of its neighbour or any other): the kernel merged the lead axes by the last one's stride
    and wrote elsewhere (garbage in half the result). Unit axes are left out of the merge now, and lead axes
    that merge only around them (strides 100 and 3 across a unit axis of stride 9) are not merged by mistake."""
    cos, sin = _tables(4)
    base = torch.randn(2, 1, 4, 3, device=DEVICE)
    spread = torch.randn(2, 100, device=DEVICE).as_strided((2, 1, 3, 2, 4), (100, 9, 3, 0, 1))[:, :, :, :1]
    positions = torch.tensor([3, 0, 7], device=DEVICE)
    for x, layout, kwargs in ((base, "... d s", {}), (base.transpose(2, 3), "... s d", {}),
                              (spread, "... s h d", {}), (spread[..., 0, :], "... s d", dict(positions=positions))):
        fast, slow = _both(monkeypatch, lambda: compute_rope(x, cos, sin, layout, **kwargs))
        assert torch.equal(fast, slow), layout
