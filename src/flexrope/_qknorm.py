"""QK-norm fused with the rotation: each head's channels RMS-normalised, scaled, then rotated, in one pass.

Qwen3, Gemma 3 and OLMo-style attention normalise every head of q and k over its head dim just before the
rotation: ``n = x / sqrt(mean(x^2) + eps) * (offset + w)`` (offset 1.0 is Gemma's ``1 + weight``), computed
in float32 (float64 for float64) and rotated in that dtype, rounded once to x's dtype at the end. The
backward is written out: the incoming gradient rotated back by the negated angles, then RMSNorm's backward
for x and w. Plain tensor operations both ways, so torch.compile traces it whole.
"""

from __future__ import annotations

import os
import weakref

import torch

from . import _native
from ._dispatch import triton_fused, write_at
from ._errors import FlexRopeError, described
from ._pairs import as_dtype, compute_dtype, expression
from ._positions import Where, angles_at, position_tensor


def check_norm(weight: object, eps: object, offset: object, x: torch.Tensor, head_dim: int, name: str = "norm"
               ) -> tuple[torch.Tensor, float, float]:
    """The norm's weight (head_dim,), eps and offset, checked."""
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point or weight.shape != (head_dim,):
        raise FlexRopeError(f"{name}_weight is a {described(weight)}: expected a floating tensor ({head_dim},), one "
                            f"weight per channel of the head dim")
    if weight.device != x.device:
        raise FlexRopeError(f"{name}_weight is on {weight.device} but x is on {x.device}: move it with .to()")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise FlexRopeError(f"{name}_eps={eps!r}: expected a number >= 0 (e.g. 1e-6)")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise FlexRopeError(f"{name}_weight_offset={offset!r}: expected a number (0.0, or 1.0 for Gemma's "
                            f"1 + weight)")
    return weight, float(eps), float(offset)


def _scale(xf: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


class NormRope(torch.autograd.Function):
    """``rotate(x / rms(x) * (offset + w))`` over canonical views, with gradients for x and w."""

    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps: float, offset: float, rotary_dim: int, interleaved: bool):
        compute = compute_dtype(x.dtype)
        xf = as_dtype(x, compute)
        gain = as_dtype(weight, compute) + offset
        normed = xf * _scale(xf, eps) * gain
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.settings = (eps, offset, rotary_dim, interleaved)
        return expression(normed, as_dtype(cos, compute), as_dtype(sin, compute), rotary_dim, interleaved
                          ).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, cos, sin = ctx.saved_tensors
        eps, offset, rotary_dim, interleaved = ctx.settings
        compute = compute_dtype(x.dtype)
        xf = as_dtype(x, compute)
        # the rotation's transpose is the rotation by the negated angles
        grad_n = expression(as_dtype(grad, compute), as_dtype(cos, compute), -as_dtype(sin, compute), rotary_dim,
                            interleaved)
        scale = _scale(xf, eps)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            u = grad_n * (as_dtype(weight, compute) + offset)
            grad_x = (scale * (u - xf * scale.pow(2) * (u * xf).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_n * xf * scale).flatten(0, -2).sum(0).to(weight.dtype)
        return grad_x, grad_w, None, None, None, None, None, None


def _eps_attribute(norm: object) -> object:
    """The norm's ``.eps`` or ``.variance_epsilon``: from its plain attributes (nn.Module's __getattr__ fails slowly
    for a name it lacks), else where its class declares it (a class attribute, a slot, a property)."""
    attributes = getattr(norm, "__dict__", {})
    if "eps" in attributes:
        return attributes["eps"]
    if "variance_epsilon" in attributes:
        return attributes["variance_epsilon"]
    for name in ("eps", "variance_epsilon"):
        if hasattr(type(norm), name):
            return getattr(norm, name, None)
    return None


_probed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # norm -> (class, weight dtype, eps, offset)


@torch.compiler.assume_constant_result  # (traced by torch.compile: run once while tracing, a constant in the graph)
def _gain_offset(norm: object, name: str, eps: float) -> float:
    """0.0 if ``norm`` scales by ``weight``, 1.0 if by ``1 + weight`` (Gemma's), found by calling it once on a
    probe in its weight's dtype (two rows of head_dim channels with a non-zero mean, the second as small as eps;
    its hooks run too) and comparing with the formula in float64; remembered per module, its class, its
    weight's dtype and eps. Anything else (a LayerNorm, another eps, a norm over another axis) is refused: a
    class name or a source text could not say so, and a wrong offset or a LayerNorm taken for an RMSNorm would
    give wrong numbers without an error."""
    weight = norm.weight
    try:
        remembered = _probed.get(norm)
    except TypeError:  # (not weakly referenceable: probed each time)
        remembered = None
    if remembered is not None and remembered[:3] == (type(norm), weight.dtype, eps):
        return remembered[3]
    d = weight.shape[-1]
    row = torch.linspace(-1.0, 2.0, d, dtype=torch.float64)  # mean 0.5: a LayerNorm differs
    rows = [row] + ([row * (eps / row.pow(2).mean()).sqrt()] if eps > 0 else [])  # the second: eps matters
    probe = torch.stack(rows)
    try:
        with torch.no_grad():
            got = norm(probe.to(weight.dtype).to(weight.device))
        got = got.detach().to("cpu", torch.float64)
    except Exception as error:  # (any failure of the caller's module: reported with it)
        raise FlexRopeError(f"{name} ({type(norm).__name__}) failed on a probe {tuple(probe.shape)} in "
                            f"{weight.dtype} ({type(error).__name__}: {error}): pass a tuple (weight, eps, offset) "
                            f"instead") from None
    probe = probe.to(weight.dtype).double()  # (as the module saw it)
    w = weight.detach().to("cpu", torch.float64)
    normed = probe * (probe.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    tolerance = 4 * torch.finfo(weight.dtype).eps if weight.dtype != torch.float64 else 1e-12
    fits = []
    for offset in (0.0, 1.0):
        expected = normed * (offset + w)
        if got.shape == expected.shape and float((got - expected).abs().max()) <= tolerance * (
                1.0 + float(expected.abs().max())):
            fits.append(offset)
    if len(fits) != 1:
        what = ("fits neither x / sqrt(mean(x^2) + eps) * weight nor * (1 + weight)" if not fits else
                "fits both * weight and * (1 + weight) within the rounding (its weights are too large to tell)")
        raise FlexRopeError(f"{name} ({type(norm).__name__}, eps={eps}) {what} on a probe over its {d} channels: "
                            f"the fused norm is an RMSNorm over the head dim (a LayerNorm subtracts the mean); pass "
                            f"a tuple (weight, eps, offset) if it is one, or normalise before the rotation")
    try:
        _probed[norm] = (type(norm), weight.dtype, eps, fits[0])
    except TypeError:
        pass
    return fits[0]


def norm_settings(norm: object, name: str, x: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, float, float]:
    """(weight, eps, offset) of a model's RMSNorm module for ``x``, checked: ``torch.nn.RMSNorm`` or anything
    with ``.weight`` and ``.eps`` or ``.variance_epsilon`` (transformers' Qwen3RMSNorm), its offset (1.0 where
    it scales by ``1 + weight``, as Gemma's do) found by calling it once on a probe (``_gain_offset``); or a
    tuple (weight, eps, offset)."""
    if isinstance(norm, tuple) and len(norm) == 3:
        return check_norm(*norm, x, head_dim, name)
    weight, eps = getattr(norm, "weight", None), _eps_attribute(norm)
    if isinstance(norm, torch.nn.Module) and weight is None and hasattr(norm, "weight"):  # a norm with no gain
        raise FlexRopeError(f"{name} is a {type(norm).__name__} without a weight (e.g. elementwise_affine=False): "
                            f"pass a tuple (torch.ones({head_dim}), eps, 0.0)")
    if not isinstance(weight, torch.Tensor) or not callable(norm):
        raise FlexRopeError(f"{name} is a {type(norm).__name__}: expected an RMSNorm module (.weight and .eps or "
                            f".variance_epsilon, e.g. torch.nn.RMSNorm) or a tuple (weight, eps, offset)")
    if eps is None:  # torch.nn.RMSNorm(eps=None): the machine epsilon of the dtype it computes in, as torch does
        eps = torch.finfo(compute_dtype(x.dtype)).eps
    weight, eps, _ = check_norm(weight, eps, 0.0, x, head_dim, name)
    return weight, eps, _gain_offset(norm, name, eps)


_modules: dict[tuple, tuple] = {}
_plain_weight: dict[type, bool] = {}  # classes whose .weight is nn.Module's parameter table's (no property)


def _weight_of(norm: object) -> object:
    """``norm.weight``, read from an nn.Module's parameter table where its class does not define ``weight`` itself
    (nn.Module's __getattr__ is Python, the larger part of a remembered norm's check)."""
    kind = type(norm)
    plain_weight = _plain_weight.get(kind)
    if plain_weight is None:
        plain_weight = _plain_weight[kind] = isinstance(norm, torch.nn.Module) and not hasattr(kind, "weight")
    if plain_weight:
        weight = norm._parameters.get("weight")
        if weight is not None:
            return weight
    return getattr(norm, "weight", None)


def module_norm(norm: object, name: str, x: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, float, float]:
    """``norm_settings`` of ``norm`` for a CPU ``x``: a module's remembered while it is of the
    same class, holds the same weight tensor, of the same shape and dtype and
    on the CPU (``.data =`` can change them), and the same eps (a decoding step asks for each layer's two norms
    every call, and the lookups and checks cost more than the loop's work). The weight's values are not
    remembered: the loop reads them at each call."""
    key = (id(norm), x.dtype, head_dim)
    entry = _modules.get(key)
    if entry is not None:  # (both held weakly: a weight may be a view of a large buffer, kept whole by a view)
        owner, kind, weight_ref, eps_attribute, dtype, settings = entry
        weight = _weight_of(norm) if owner() is norm else None
        if (weight is not None and weight is weight_ref() and type(norm) is kind
                and _eps_attribute(norm) is eps_attribute and weight.dtype is dtype and weight.ndim == 1
                and weight.shape[0] == head_dim and weight.is_cpu):
            return (weight, *settings)
    weight, eps, offset = norm_settings(norm, name, x, head_dim)
    try:
        owner = weakref.ref(norm)
    except TypeError:  # a tuple (no weak reference)
        return weight, eps, offset
    if len(_modules) >= 256:
        _modules.clear()
    _modules[key] = (owner, type(norm), weakref.ref(weight), _eps_attribute(norm), weight.dtype, (eps, offset))
    return weight, eps, offset


def native_applies(x: torch.Tensor) -> bool:
    """Whether the C loop may run a call on ``x`` (the CPU, eagerly, the backend not forced to another)."""
    return x.is_cpu and not torch.compiler.is_compiling() and os.environ.get("FLEXROPE_BACKEND", "auto") in (
        "auto", "native")


def _native_into(x_c, out_c, weight, eps, offset, cos, sin, where, rotary_dim, interleaved, out_index=None) -> bool:
    """The norm and rotation by the C loop, in one pass, into ``out_c`` (at ``out_index`` where given); False
    where it does not apply."""
    if not native_applies(x_c):
        return False
    return _native.rotate(x_c, out_c, cos, sin, where, rotary_dim=rotary_dim, interleaved=interleaved, inverse=False,
                          weight=weight, offset=offset, eps=eps, out_index=out_index)


def _gain(weight: torch.Tensor, dtype: torch.dtype, offset: float) -> torch.Tensor:
    """offset + weight, contiguous in ``dtype``, for the Triton kernel: made at each call (two small operations),
    nothing of the weight remembered, since a write through ``.data`` changes neither its address nor its
    version."""
    return (as_dtype(weight.detach(), dtype) + offset).contiguous()


def normed_rotation(layout, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, cos: torch.Tensor,
                    sin: torch.Tensor, where: Where, seq_len: int, rotary_dim: int, interleaved: bool,
                    out: torch.Tensor | None = None, out_index: torch.Tensor | None = None) -> torch.Tensor:
    """The QK-norm then the rotation of ``x`` (laid out as ``layout``) at ``where``, values already checked;
    written into ``out`` where given (checked, no gradient needed), at the sequence indices ``out_index`` (b, s)
    where given (checked). Without a gradient to compute, on the CPU, the C loop does it in one pass."""
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        target = out if out is not None else torch.empty_like(x)  # x's strides where x is dense
        if _native_into(layout.canonical(x), layout.canonical(target), weight, eps, offset, cos, sin, where,
                        rotary_dim, interleaved, out_index):
            torch.autograd.graph.increment_version(target)
            return target
        if not torch.compiler.is_compiling() and triton_fused(  # (traced: the gain's cache key reads addresses)
                layout, x, target, cos, sin, where, rotary_dim, interleaved,
                gain=_gain(weight, compute_dtype(x.dtype), offset), eps=eps, index=out_index):
            return target
    if out_index is not None:  # elsewhere: into a temporary, then written at the indices
        return write_at(layout, normed_rotation(layout, x, weight, eps, offset, cos, sin, where, seq_len, rotary_dim,
                                                interleaved), out, out_index)
    where = position_tensor(where, seq_len)
    half = rotary_dim // 2
    c, s = angles_at(cos, where, seq_len, half), angles_at(sin, where, seq_len, half)
    result = layout.from_canonical(NormRope.apply(layout.canonical(x), weight, c, s, eps, offset, rotary_dim,
                                                  interleaved))
    if out is None:  # x's memory order, as every other path returns it (the function returns the canonical one)
        out = torch.empty_like(x)
        if out.stride() == result.stride():
            return result
    return out.copy_(result)
