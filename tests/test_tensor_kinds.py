"""Every kind of tensor torch can make: a result equal to the eager backend's, or a FlexRopeError; never a crash.

Tensors without storage of their own (subclasses, FakeTensors, torch.func's wrapped tensors) must never reach
a kernel that reads through a pointer; those tests run in a subprocess, so that a crash fails the test rather
than the test run."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flexrope
from flexrope import FlexRopeError, compute_rope
from flexrope._pairs import overlaps

SRC = str(Path(flexrope.__file__).parent.parent)
COS, SIN = flexrope.precompute_rope_params(16, context_length=64)


def _run(code: str, backend: str) -> str:
    env = {**os.environ, "PYTHONPATH": SRC, "FLEXROPE_BACKEND": backend}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    return result.stdout


@pytest.mark.parametrize("backend", ["auto", "native"])
def test_subclasses_without_storage_run_as_torch_operations(backend):
    out = _run("""
        import torch, flexrope
        from torch.testing._internal.logging_tensor import LoggingTensor
        from torch._subclasses.fake_tensor import FakeTensorMode
        cos, sin = flexrope.precompute_rope_params(16, context_length=64)
        for shape in [(2, 5, 3, 16), (2, 64, 4, 16)]:  # a small call and a chunked one
            x = torch.randn(shape)
            with torch.no_grad():
                expected = flexrope.compute_rope(x.double(), cos.double(), sin.double(), "b s h d")
            for inplace in (False, True):
                out = flexrope.compute_rope(LoggingTensor(x.clone()), cos, sin, "b s h d", inplace=inplace)
                assert type(out) is LoggingTensor, type(out)
                torch.testing.assert_close(out.elem.double(), expected, atol=1e-6, rtol=0)
        mode = FakeTensorMode()
        with mode:
            fake = torch.empty(2, 5, 3, 16)
            out = flexrope.compute_rope(fake, mode.from_tensor(cos), mode.from_tensor(sin), "b s h d")
            assert type(out).__name__ == "FakeTensor" and out.shape == fake.shape
        try:  # outside its mode, with real tables: torch's own refusal to mix them, not a crash
            flexrope.compute_rope(fake, cos, sin, "b s h d")
        except Exception as error:
            print(type(error).__name__)
        print("done")
    """, backend)
    assert out.strip().endswith("done")


def _batched_reference(x: torch.Tensor, layout: str, **kwargs) -> torch.Tensor:
    return compute_rope(x.double(), COS.double(), SIN.double(), layout, **kwargs).to(x.dtype)


def test_vmap_over_a_batch_equals_the_batched_call():
    x = torch.randn(4, 5, 3, 16)
    out = torch.vmap(lambda t: compute_rope(t, COS, SIN, "s h d"))(x)
    torch.testing.assert_close(out, compute_rope(x, COS, SIN, "b s h d"), atol=0, rtol=0)
    torch.testing.assert_close(out, _batched_reference(x, "b s h d"), atol=1e-6, rtol=0)


def test_vmap_over_an_inner_dim_with_positions():
    x = torch.randn(4, 5, 3, 16)
    positions = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3], [5, 8, 9, 7, 9], [0, 0, 1, 2, 63]])
    # the batch at dim 2 of (s, h, b, d): each sample (s, h, d)
    out = torch.vmap(lambda t, p: compute_rope(t, COS, SIN, "s h d", positions=p), in_dims=(2, 0), out_dims=2)(
        x.permute(1, 2, 0, 3), positions)
    expected = _batched_reference(x, "b s h d", positions=positions).permute(1, 2, 0, 3)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    with pytest.raises(FlexRopeError, match="reach position 64"):
        torch.vmap(lambda t, p: compute_rope(t, COS, SIN, "s h d", positions=p))(x, positions + 1)


def test_vmap_of_the_module():
    x = torch.randn(3, 5, 2, 16)
    per_sample = flexrope.RotaryEmbedding(head_dim=16, context_length=64, layout="s h d")
    batched = flexrope.RotaryEmbedding(head_dim=16, context_length=64, layout="b s h d")
    torch.testing.assert_close(torch.vmap(per_sample)(x), batched(x), atol=0, rtol=0)


def _loss(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view(x.shape)
    return (compute_rope(x, COS.double(), SIN.double(), "s h d", positions=positions) ** 2 * weights).sum()


def test_func_grad_equals_autograd():
    x = torch.randn(5, 3, 16, dtype=torch.float64)
    positions = torch.tensor([7, 0, 3, 3, 60])
    grad = torch.func.grad(_loss)(x, positions)
    leaf = x.clone().requires_grad_()
    _loss(leaf, positions).backward()
    torch.testing.assert_close(grad, leaf.grad, atol=1e-12, rtol=0)
    assert grad.abs().sum() > 0


def test_func_jacrev_is_the_rotation_matrix():
    x = torch.randn(2, 1, 4, dtype=torch.float64)
    cos, sin = flexrope.precompute_rope_params(4, context_length=8, dtype=torch.float64)
    jacobian = torch.func.jacrev(lambda t: compute_rope(t, cos, sin, "s h d", offset=3))(x)
    expected = torch.autograd.functional.jacobian(lambda t: compute_rope(t, cos, sin, "s h d", offset=3), x)
    torch.testing.assert_close(jacobian, expected, atol=1e-12, rtol=0)
    # token 1, pair (0, 2) turns by 4 * inv_freq[0] = 4 radians: the rotation's own matrix
    block = jacobian[1, 0][:, 1, 0][[0, 2]][:, [0, 2]]
    angle = torch.tensor(4.0, dtype=torch.float64)
    torch.testing.assert_close(block, torch.stack([torch.stack([angle.cos(), -angle.sin()]),
                                                   torch.stack([angle.sin(), angle.cos()])]), atol=1e-12, rtol=0)
    assert not jacobian[0, :, :, 1].any() and not jacobian[1, :, :, 0].any()  # no token mixes in another


@pytest.mark.parametrize("make, match", [
    (lambda x: x.to_sparse(), "layout torch.sparse_coo: expected a dense strided tensor; pass x.to_dense"),
    (lambda x: x.reshape(-1, 16).to_sparse_csr(), "layout torch.sparse_csr"),
    (lambda x: torch.nested.nested_tensor([x[0], x[1, :3]]), r"x is a nested tensor: rotate its sequences"),
    (lambda x: torch.nested.nested_tensor([x[0], x[1, :3]], layout=torch.jagged), r"x is a nested tensor"),
])
def test_sparse_and_nested_tensors_are_refused(make, match):
    x = torch.randn(2, 5, 3, 16)
    layout = "s d" if x.ndim == 2 else "b s h d"
    made = make(x)
    with pytest.raises(FlexRopeError, match=match):
        compute_rope(made, COS, SIN, layout if made.ndim == 4 else "s d")
    with pytest.raises(FlexRopeError, match=match):
        flexrope.RotaryEmbedding(head_dim=16, context_length=64, layout="b s h d")(made)


def test_sparse_tables_are_refused():
    with pytest.raises(FlexRopeError, match=r"cos is a torch.float32 tensor of shape \(64, 16\) \(torch.sparse_coo\)"):
        compute_rope(torch.randn(5, 3, 16), COS.to_sparse(), SIN, "s h d")


def _brute_overlap(shape, strides) -> bool:
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(shape, strides):
        offsets = (offsets[..., None] + stride * torch.arange(size)).flatten()
    return offsets.numel() != offsets.unique().numel()


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 40)), min_size=1, max_size=4))
def test_overlap_is_decided_exactly(dims):
    shape, strides = tuple(d[0] for d in dims), tuple(d[1] for d in dims)
    assert overlaps(shape, strides) == _brute_overlap(shape, strides), (shape, strides)


OVERLAPPING = {
    "across heads and rows": lambda base: base[:256].as_strided((2, 5, 3, 16), (120, 24, 8, 1)),
    "unfold windows": lambda base: base[:640].view(40, 16).unfold(0, 5, 2).permute(0, 2, 1).unsqueeze(0),
    "expanded": lambda base: base[:80].view(1, 5, 1, 16).expand(2, 5, 3, 16),
}
APART = {  # views torch's own overlap test cannot decide, or gapped and transposed ones
    "interleaved gaps": lambda base: base.as_strided((2, 3, 2, 16), (40, 96, 17, 1)),
    "steps": lambda base: base.view(4, 10, 4, 16)[::2, ::3, 1:],
    "transposed": lambda base: base[:1280].view(2, 4, 10, 16).transpose(1, 2),
    "unfold without overlap": lambda base: base[:640].view(40, 16).unfold(0, 5, 5).permute(0, 2, 1).unsqueeze(0),
    "size one dims with any stride": lambda base: base.as_strided((1, 5, 1, 16), (3, 16, 7, 1)),
}


@pytest.mark.parametrize("name", OVERLAPPING)
def test_inplace_on_overlapping_memory_is_refused_with_nothing_written(name):
    base = torch.randn(2560)
    before = base.clone()
    with pytest.raises(FlexRopeError, match="overlap in memory"):
        compute_rope(OVERLAPPING[name](base), COS, SIN, "b s h d", inplace=True)
    assert torch.equal(base, before)


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("name", APART)
def test_inplace_on_every_view_apart_in_memory(name, backend, monkeypatch):
    monkeypatch.setenv("FLEXROPE_BACKEND", backend)
    base = torch.randn(2560)
    view = APART[name](base)
    assert not _brute_overlap(view.shape, view.stride())
    expected, untouched = _batched_reference(view, "b s h d"), base.clone()
    mask = torch.ones_like(base, dtype=torch.bool)
    mask[torch.arange(base.numel()).as_strided(view.shape, view.stride(), view.storage_offset()).flatten()] = False
    out = compute_rope(view, COS, SIN, "b s h d", inplace=True)
    assert out is view
    torch.testing.assert_close(view, expected, atol=1e-6, rtol=0)
    assert torch.equal(base[mask], untouched[mask])  # nothing outside the view is written
