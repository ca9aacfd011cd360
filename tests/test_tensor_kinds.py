"""Every kind of tensor torch can make: a result equal to the eager backend's, or a FlexRopeError, never a crash.

Tensors a kernel must not read through a pointer (subclasses, the negation bit) run in a subprocess: a crash
there fails a test instead of ending the run.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import flexrope
from flexrope._kinds import overlaps

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Each kind of x (and tables, positions), rotated by every backend that runs on this machine and by the eager
# backend on plain copies; printed as {"backend kind": max abs difference, or a description of what went wrong}.
_SCRIPT = r"""
import json, os, sys, warnings
warnings.simplefilter("ignore")
import torch, flexrope
from torch.testing._internal.logging_tensor import LoggingTensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

torch.manual_seed(0)
cos, sin = flexrope.precompute_rope_params(16, context_length=32)
x = torch.randn(3, 5, 4, 16)  # b s h d: 4 heads, strided unlike the canonical view
positions = torch.tensor([4, 0, 9, 2, 7])
unwrap = lambda t: t.elem if isinstance(t, LoggingTensor) else t

def rotated(x, tables=(cos, sin), where=None, inplace=False):
    out = flexrope.compute_rope(x, *tables, "b s h d", positions=where, inplace=inplace)
    if inplace and out is not x:
        raise AssertionError("inplace=True did not return x")
    return out

def plainly(t):  # the same values in a plain tensor
    if torch._is_functional_tensor(t):
        torch._sync(t)
        t = torch._from_functional_tensor(t)
    return unwrap(t).resolve_neg().clone()

def negated_bit(t):  # t's values, stored negated with the negation bit set (channels 2 apart)
    return torch.complex(torch.zeros_like(t), -t).conj().imag

def negated_view(t):  # the same, channels side by side
    return torch._neg_view(-t)

cases = {  # x, tables, positions, in place
    "logging": lambda: (LoggingTensor(x.clone()), (cos, sin), None, False),
    "logging inplace": lambda: (LoggingTensor(x.clone()), (cos, sin), None, True),
    "logging tables": lambda: (x.clone(), (LoggingTensor(cos), LoggingTensor(sin)), None, False),
    "logging positions": lambda: (x.clone(), (cos, sin), LoggingTensor(positions), False),
    "negated bit": lambda: (negated_bit(x), (cos, sin), None, False),
    "negated bit inplace": lambda: (negated_bit(x), (cos, sin), None, True),
    "negated bit tables": lambda: (x.clone(), (negated_bit(cos), negated_bit(sin)), positions, False),
    "negated view": lambda: (negated_view(x), (cos, sin), None, False),
    "negated view inplace": lambda: (negated_view(x), (cos, sin), None, True),
    "negated view tables": lambda: (x.clone(), (negated_view(cos), negated_view(sin)), None, False),
    "functional": lambda: (torch._to_functional_tensor(x.clone()), (cos, sin), None, False),
    "functional inplace": lambda: (torch._to_functional_tensor(x.clone()), (cos, sin), None, True),
    "parameter": lambda: (torch.nn.Parameter(x.clone(), requires_grad=False), (cos, sin), positions, False),
}
backends = ["auto", "native", "eager"] + sys.argv[1:]
results = {}
for backend in backends:
    for name, case in cases.items():
        key = f"{backend} {name}"
        try:
            xi, tables, where, inplace = case()
            os.environ["FLEXROPE_BACKEND"] = "eager"
            reference = rotated(plainly(xi), tuple(map(plainly, tables)), where if where is None else plainly(where))
            os.environ["FLEXROPE_BACKEND"] = backend
            out = plainly(rotated(xi, tables, where, inplace))
            same = out.shape == reference.shape and out.dtype == reference.dtype
            results[key] = (out - reference).abs().max().item() if same else f"{out.shape} {out.dtype}"
        except Exception as error:
            results[key] = f"{type(error).__name__}: {error}"
    try:  # the module on q and k of different kinds: both in one call
        rope = flexrope.RotaryEmbedding(16, layout="b s h d", context_length=32)
        os.environ["FLEXROPE_BACKEND"] = "eager"
        expected = rope(x, x[:, :, :2] * 2)
        os.environ["FLEXROPE_BACKEND"] = backend
        got = rope(torch.nn.Parameter(x.clone(), requires_grad=False), LoggingTensor(x[:, :, :2] * 2))
        results[f"{backend} module"] = max((plainly(g) - e).abs().max().item() for g, e in zip(got, expected))
    except Exception as error:
        results[f"{backend} module"] = f"{type(error).__name__}: {error}"
    os.environ["FLEXROPE_BACKEND"] = backend
    try:  # a fake tensor outside its mode: its shape and dtype, as eager gives them
        mode = FakeTensorMode()
        fake_x, fake_cos, fake_sin = (mode.from_tensor(t) for t in (x, cos, sin))
        out = flexrope.compute_rope(fake_x, fake_cos, fake_sin, "b s h d")
        good = isinstance(out, FakeTensor) and out.shape == x.shape and out.stride() == x.stride()
        results[f"{backend} fake"] = 0.0 if good else f"{type(out).__name__} {out.shape} {out.stride()}"
    except Exception as error:
        results[f"{backend} fake"] = f"{type(error).__name__}: {error}"
print(json.dumps(results))
"""

_CASES = ["logging", "logging inplace", "logging tables", "logging positions", "negated bit", "negated bit inplace",
          "negated bit tables", "negated view", "negated view inplace", "negated view tables", "functional",
          "functional inplace", "parameter", "module", "fake"]
# The compiled backend builds a loop with torch.compile (slow to start): forced here on the kinds it must refuse.
_BACKENDS = ["auto", "native", "eager", "triton"]


@pytest.fixture(scope="module")
def kinds_results():
    env = {**os.environ, "PYTHONPATH": SRC, "TRITON_INTERPRET": "1"}
    extra = ["triton"] if flexrope._dispatch.TRITON_INSTALLED else []
    result = subprocess.run([sys.executable, "-c", _SCRIPT, *extra], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, f"the process ended with {result.returncode}: {result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("kind", _CASES)
def test_every_kind_equals_the_eager_backend(kinds_results, backend, kind):
    key = f"{backend} {kind}"
    if backend == "triton" and not flexrope._dispatch.TRITON_INSTALLED:
        pytest.skip("triton is not installed")
    value = kinds_results[key]
    assert isinstance(value, float) and value <= 1e-6, f"{key}: {value}"


@pytest.fixture
def tables():
    return flexrope.precompute_rope_params(16, context_length=32)


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_vmap_equals_the_batched_call(tables, backend, monkeypatch):
    monkeypatch.setenv("FLEXROPE_BACKEND", backend)
    cos, sin = tables
    x = torch.randn(3, 5, 4, 16)
    expected = flexrope.compute_rope(x, cos, sin, "b s h d")
    got = torch.vmap(lambda t: flexrope.compute_rope(t, cos, sin, "s h d"))(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    got = torch.vmap(lambda t: flexrope.compute_rope(t, cos, sin, "b s d"), in_dims=2, out_dims=2)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    inplace = x.clone()
    torch.vmap(lambda t: flexrope.compute_rope(t, cos, sin, "s h d", inplace=True))(inplace)
    torch.testing.assert_close(inplace, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_func_grad_and_jacrev_equal_autograd(tables, backend, monkeypatch):
    monkeypatch.setenv("FLEXROPE_BACKEND", backend)
    cos, sin = tables
    x = torch.randn(2, 5, 3, 16, dtype=torch.float64)
    weight = torch.randn(2, 5, 3, 16, dtype=torch.float64)
    positions = torch.tensor([3, 1, 4, 1, 5])

    def loss(t):
        return (flexrope.compute_rope(t, cos, sin, "b s h d", positions=positions) * weight).sum()

    leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss(leaf), leaf)
    torch.testing.assert_close(torch.func.grad(loss)(x), expected, rtol=0, atol=1e-12)

    def rotate(t):
        return flexrope.compute_rope(t, cos, sin, "s d", offset=2)

    small = torch.randn(4, 16, dtype=torch.float64)
    expected = torch.autograd.functional.jacobian(rotate, small)
    torch.testing.assert_close(torch.func.jacrev(rotate)(small), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(rotate)(small), expected, rtol=0, atol=1e-12)
    # per-example gradients: vmap over grad
    per_row = torch.func.vmap(torch.func.grad(lambda t, w: (rotate(t) * w).sum()))(x[:, :4, 0], weight[:, :4, 0])
    for i in range(2):
        row = x[i, :4, 0].clone().requires_grad_()
        (grad,) = torch.autograd.grad((rotate(row) * weight[i, :4, 0]).sum(), row)
        torch.testing.assert_close(per_row[i], grad, rtol=0, atol=1e-12)


def _sparse_and_nested():
    x = torch.randn(2, 5, 16)
    return {
        "torch.sparse_coo": x.to_sparse(),
        "torch.sparse_csr": x[0].to_sparse_csr(),
        "nested": torch.nested.nested_tensor([x[0], x[1, :3]]),
        "jagged nested": torch.nested.nested_tensor([x[0], x[1, :3]], layout=torch.jagged),
    }


@pytest.mark.parametrize("kind", ["torch.sparse_coo", "torch.sparse_csr", "nested", "jagged nested"])
def test_sparse_and_nested_x_are_refused(tables, kind):
    cos, sin = tables
    x = _sparse_and_nested()[kind]
    layout = "s d" if x.ndim == 2 else "b s d"
    hint = "unbind" if "nested" in kind else "to_dense()"
    kind = "nested" if "nested" in kind else kind
    with pytest.raises(flexrope.FlexRopeError, match=rf"x is an? {kind} tensor: only dense strided .*{hint}"):
        flexrope.compute_rope(x, cos, sin, layout)
    rope = flexrope.RotaryEmbedding(16, layout=layout, context_length=32)
    with pytest.raises(flexrope.FlexRopeError, match=rf"{kind} tensor: only dense strided"):
        rope(x)
    with pytest.raises(flexrope.FlexRopeError, match=rf"{kind} tensor: only dense strided"):
        rope(torch.randn(5, 16) if x.ndim == 2 else torch.randn(2, 5, 16), x)
    grid = flexrope.MultiAxisRotaryEmbedding(16, axes={"y": 5}, layout="b (y) d")
    with pytest.raises(flexrope.FlexRopeError, match=r"nested|sparse"):
        grid(x if x.ndim == 3 else x.to_dense().unsqueeze(0).to_sparse(), y=5)


def test_sparse_tables_are_refused(tables):
    cos, sin = tables
    with pytest.raises(flexrope.FlexRopeError, match=r"cos is a torch.sparse_coo tensor: .*to_dense\(\)"):
        flexrope.compute_rope(torch.randn(5, 16), cos.to_sparse(), sin, "s d")
    with pytest.raises(flexrope.FlexRopeError, match=r"sin is a torch.sparse_csr tensor"):
        flexrope.compute_rope(torch.randn(5, 16), cos, sin.to_sparse_csr(), "s d")


def _brute_overlaps(shape, stride):
    offsets = [sum(i * s for i, s in zip(index, stride)) for index in itertools.product(*map(range, shape))]
    return len(offsets) != len(set(offsets))


@given(st.lists(st.tuples(st.integers(0, 4), st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 40])),
                max_size=5))
@example([(1, 0), (3, 1)])  # a size-1 dim of stride 0 overlaps nothing
@example([(2, 3), (3, 2)])  # offsets 0 2 4 3 5 7: interleaved, no overlap
@example([(2, 3), (3, 2), (2, 5)])  # 5 = 3 + 2: overlaps
def test_overlap_is_decided_exactly(dims):
    shape, stride = tuple(n for n, _ in dims), tuple(s for _, s in dims)
    assert overlaps(shape, stride) == _brute_overlaps(shape, stride)


@given(st.permutations(range(4)), st.lists(st.integers(1, 3), min_size=4, max_size=4),
       st.lists(st.integers(0, 2), min_size=4, max_size=4))
def test_views_of_dense_tensors_never_overlap(order, steps, gaps):
    """Transposes, steps and padded rows: the fast proof holds (and agrees with the listing)."""
    x = torch.empty(*(3 * step + gap for step, gap in zip(steps, gaps))).permute(order)
    view = x[tuple(slice(None, None, steps[i]) for i in order)]
    assert not overlaps(view.shape, view.stride())
    assert not _brute_overlaps(view.shape, view.stride())


def test_overlap_of_a_large_view_that_interleaves():
    # 2 x 3 blocks at offsets 0, 2, 4, 3, 5, 7 (no two equal), then 2**21 of them 8 apart: listed slice by slice
    assert not overlaps((2, 3, 1 << 21), (3, 2, 8))
    assert overlaps((2, 3, 1 << 21), (3, 2, 7))


def _inplace_cases():
    storage = torch.randn(400)
    windows = torch.randn(40).unfold(0, 16, 2)  # (13, 16): windows 2 apart overlap
    return {
        "across heads and rows": (storage.as_strided((2, 5, 3, 16), (120, 24, 8, 1)), "b s h d", True),
        "unfolded windows": (windows.unsqueeze(1), "s h d", True),
        "windows across rows": (storage.as_strided((3, 4, 16), (10, 16, 1)), "b s d", True),
        "expanded": (torch.randn(1, 5, 16).expand(3, 5, 16), "b s d", True),
        "interleaved blocks": (storage.as_strided((2, 3, 1, 16), (48, 32, 999, 1)), "b h s d", False),
        "transposed": (torch.randn(3, 5, 2, 16).transpose(1, 2), "b h s d", False),
        "stepped": (storage[::2].view(2, 5, 20)[:, ::2, :16], "b s d", False),
        "size one with any stride": (storage.as_strided((1, 5, 1, 16), (0, 16, 7, 1)), "b s h d", False),
        "empty": (storage.as_strided((2, 0, 16), (0, 0, 1)), "b s d", False),
    }


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("name", list(_inplace_cases()))
def test_inplace_refuses_exactly_what_overlaps(tables, name, backend, monkeypatch):
    monkeypatch.setenv("FLEXROPE_BACKEND", backend)
    cos, sin = tables
    x, layout, overlapping = _inplace_cases()[name]
    assert overlapping == _brute_overlaps(x.shape, x.stride()) == overlaps(x.shape, x.stride())
    storage = x._base.clone() if x._base is not None else x.clone()
    before = x.clone()
    if overlapping:
        with pytest.raises(flexrope.FlexRopeError, match=r"overlap in memory .*pass inplace=False"):
            flexrope.compute_rope(x, cos, sin, layout, inplace=True)
        assert torch.equal((x._base if x._base is not None else x), storage)  # nothing written
        return
    expected = flexrope.compute_rope(before, cos, sin, layout)
    assert flexrope.compute_rope(x, cos, sin, layout, inplace=True) is x
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


# outs of kinds a kernel must not write through a pointer, into which q, k (plain or of that kind) are rotated:
# printed as {"case": max abs difference from rotating plain copies, or what went wrong}
_OUT_SCRIPT = r"""
import json, warnings
warnings.simplefilter("ignore")
import torch, flexrope
from torch.testing._internal.logging_tensor import LoggingTensor
from torch.testing._internal.two_tensor import TwoTensor

torch.manual_seed(0)
rope = flexrope.RotaryEmbedding(16, layout="b s h d", context_length=32)
q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
norm = (torch.rand(16) + 0.5, 1e-6, 0.0)
expected = {normed: rope(q, k, **(dict(q_norm=norm, k_norm=norm) if normed else {})) for normed in (False, True)}
kinds = {"two tensor": lambda t: TwoTensor(t, t.clone()), "logging": LoggingTensor}
plain = lambda t: t.a if isinstance(t, TwoTensor) else t.elem if isinstance(t, LoggingTensor) else t
results = {}
for kind, make in kinds.items():
    for normed, operands_too in ((False, False), (True, False), (False, True)):
        key = f"{kind}{' normed' if normed else ''}{' operands' if operands_too else ''}"
        try:
            q_in, k_in = (make(q), make(k)) if operands_too else (q, k)
            q_out, k_out = make(torch.zeros_like(q)), make(torch.zeros_like(k))
            norms = dict(q_norm=norm, k_norm=norm) if normed else {}
            rope(q_in, k_in, q_out=q_out, k_out=k_out, **norms)
            single = flexrope.compute_rope(k, rope.cos, rope.sin, "b s h d", out=make(torch.zeros_like(k)),
                                           **(dict(norm_weight=norm[0], norm_eps=norm[1]) if normed else {}))
            results[key] = max(float((plain(got) - want).abs().max())
                               for got, want in zip((q_out, k_out, single), (*expected[normed], expected[normed][1])))
        except Exception as error:
            results[key] = f"{type(error).__name__}: {error}"
try:  # on the meta device nothing has an address: no overlap is read into the shared address 0
    meta = flexrope.RotaryEmbedding(16, layout="b s h d", context_length=32).to("meta")
    q_out, k_out = meta(q.to("meta"), k.to("meta"), q_out=torch.empty_like(q, device="meta"),
                        k_out=torch.empty_like(k, device="meta"))
    results["meta"] = 0.0 if k_out.shape == k.shape and k_out.is_meta else f"{k_out}"
except Exception as error:
    results["meta"] = f"{type(error).__name__}: {error}"
print(json.dumps(results))
"""


def test_outs_of_every_kind_are_written_by_torch_never_through_a_pointer():
    """A subclass out (a wrapper whose storage is no memory, a logging tensor) is written by torch's operations,
    never by the C loop through its pointer (a wrapper's crashed the process), plain operands or not, fused norm
    or not; meta outs are no overlap. In a subprocess: a crash fails this test instead of ending the run."""
    env = {**os.environ, "PYTHONPATH": SRC}
    result = subprocess.run([sys.executable, "-c", _OUT_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, f"the process ended with {result.returncode}: {result.stderr[-3000:]}"
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(results) == 7, results
    bad = {key: value for key, value in results.items() if not (isinstance(value, float) and value <= 1e-6)}
    assert not bad, bad
