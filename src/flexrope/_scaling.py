"""Context-extension recipes: how each ``rope_type`` changes the inverse frequencies and scales cos/sin.

Formulas follow Hugging Face transformers (``modeling_rope_utils.py``), evaluated in float64:

- ``linear``: inv_freq / factor.
- ``dynamic`` (NTK): for a sequence of length L > L0, base' = theta * (factor * L / L0 - (factor - 1)) **
  (r / (r - 2)); the original frequencies for L <= L0.
- ``llama3``: wavelengths shorter than L0 / high_freq_factor keep their frequency, longer than
  L0 / low_freq_factor are divided by factor, and those between are blended smoothly.
- ``yarn``: a linear ramp between the dims that rotate beta_fast and beta_slow times over L0 blends the
  interpolated (inv / factor) and extrapolated (inv) frequencies; cos and sin are multiplied by an attention
  factor (given, or from mscale and mscale_all_dim, or 0.1 ln(factor) + 1).
- ``longrope``: inv = inv / ext, ext the long factors when the sequence is longer than L0 and the short ones
  otherwise; cos and sin multiplied by sqrt(1 + ln(factor) / ln(L0)).
- ``proportional`` (Gemma 4): over the whole head, the first ``partial_rotary_factor * r / 2`` pairs keep
  theta^(-2i / r) and the rest get frequency 0 (they do not rotate); all divided by factor. Unlike a partial
  rotary dim, the pairs that rotate are the first ones of each half.

L0 is ``original_max_position_embeddings``. Two recipes depend on the length of the sequence being rotated
(``dynamic``, ``longrope``): :func:`frequencies` takes that length.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ._errors import FlexRopeError

# Keys each rope_type accepts; "required" must be present.
_KEYS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor", "original_max_position_embeddings"), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"),
    ),
    "longrope": (("short_factor", "long_factor", "original_max_position_embeddings"), ("factor", "attention_factor")),
    "proportional": ((), ("factor", "partial_rotary_factor")),
}
# Keys of a Hugging Face rope_parameters dict that are not recipe parameters: checked against the call.
_SHARED_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
LENGTH_DEPENDENT = ("dynamic", "longrope")


@dataclass(frozen=True)
class Scaling:
    """A checked recipe: its type and parameters (floats, or tuples of floats for longrope's factors)."""

    rope_type: str
    params: tuple[tuple[str, object], ...]

    def __getitem__(self, key: str):
        return self._by_key.get(key)

    @functools.cached_property
    def _by_key(self) -> dict[str, object]:
        return dict(self.params)

    @property
    def original_length(self) -> int | None:
        return self["original_max_position_embeddings"]

    @property
    def length_dependent(self) -> bool:
        return self.rope_type in LENGTH_DEPENDENT


def _number(value: object, key: str, rope_type: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FlexRopeError(f"scaling[{key!r}]={value!r} for rope_type {rope_type!r}: expected a finite number")
    if positive and value <= 0:
        raise FlexRopeError(f"scaling[{key!r}]={value!r} for rope_type {rope_type!r}: expected a number > 0")
    return float(value)


def parse_scaling(scaling: object, *, rotary_dim: int, head_dim: int, theta_base: float) -> Scaling | None:
    """Check a Hugging Face ``rope_scaling`` / ``rope_parameters`` dict (or the seed's llama3 ``freq_config``)."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise FlexRopeError(f"scaling={scaling!r}: expected None or a dict with a 'rope_type'")
    scaling = dict(scaling)
    if "rope_type" not in scaling and "type" not in scaling and "original_context_length" in scaling:
        # The seed's llama3 freq_config: the same recipe, L0 under another name.
        scaling["rope_type"] = "llama3"
        scaling["original_max_position_embeddings"] = scaling.pop("original_context_length")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type is None:
        raise FlexRopeError(f"scaling={scaling!r} has no 'rope_type': one of {', '.join(_KEYS)}")
    if "rope_type" in scaling and "type" in scaling and scaling["type"] != scaling["rope_type"]:
        raise FlexRopeError(f"scaling has rope_type {scaling['rope_type']!r} but type {scaling['type']!r}")
    if rope_type not in _KEYS:
        raise FlexRopeError(f"scaling rope_type {rope_type!r} is unknown: expected one of {', '.join(_KEYS)}")
    if "rope_theta" in scaling and float(scaling["rope_theta"]) != float(theta_base):
        raise FlexRopeError(
            f"scaling['rope_theta']={scaling['rope_theta']!r} but theta_base={theta_base!r}: pass "
            f"theta_base={scaling['rope_theta']!r}"
        )
    if rope_type != "proportional" and "partial_rotary_factor" in scaling and (
        int(head_dim * scaling["partial_rotary_factor"]) != rotary_dim
    ):
        raise FlexRopeError(
            f"scaling['partial_rotary_factor']={scaling['partial_rotary_factor']!r} means rotary_dim="
            f"{int(head_dim * scaling['partial_rotary_factor'])} for head dim {head_dim}, but rotary_dim={rotary_dim}"
        )
    required, optional = _KEYS[rope_type]
    for key in scaling:
        if key not in required and key not in optional and key not in _SHARED_KEYS:
            accepted = ", ".join(required + optional) or "no parameters"
            raise FlexRopeError(f"scaling key {key!r} is not a parameter of rope_type {rope_type!r} (it takes "
                                f"{accepted})")
    for key in required:
        if scaling.get(key) is None:
            raise FlexRopeError(f"scaling for rope_type {rope_type!r} is missing {key!r}")
    params: dict[str, object] = {}
    for key in required + optional:
        value = scaling.get(key)
        if value is None:
            continue
        if key in ("short_factor", "long_factor"):
            if not isinstance(value, (list, tuple)) or len(value) != rotary_dim // 2:
                raise FlexRopeError(
                    f"scaling[{key!r}] has {len(value) if isinstance(value, (list, tuple)) else type(value).__name__}"
                    f" entries: expected a list of rotary_dim/2 = {rotary_dim // 2} numbers"
                )
            params[key] = tuple(_number(v, key, rope_type) for v in value)
        elif key == "truncate":
            if not isinstance(value, bool):
                raise FlexRopeError(f"scaling['truncate']={value!r}: expected True or False")
            params[key] = value
        elif key == "original_max_position_embeddings":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FlexRopeError(f"scaling[{key!r}]={value!r}: expected a positive int")
            params[key] = value
        else:
            params[key] = _number(value, key, rope_type, positive=key not in ("mscale", "mscale_all_dim"))
    if rope_type == "proportional" and params.get("partial_rotary_factor", 1.0) > 1:
        raise FlexRopeError(f"scaling['partial_rotary_factor']={params['partial_rotary_factor']!r}: expected at most 1")
    if rope_type == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
        raise FlexRopeError("scaling['high_freq_factor'] must be larger than scaling['low_freq_factor']")
    if rope_type == "longrope" and "factor" not in params and "attention_factor" not in params:
        raise FlexRopeError(
            "scaling for rope_type 'longrope' needs 'factor' (max_position_embeddings / "
            "original_max_position_embeddings) or 'attention_factor'"
        )
    return Scaling(rope_type=rope_type, params=tuple(params.items()))


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv: torch.Tensor, s: Scaling, rotary_dim: int, theta: float) -> torch.Tensor:
    def correction_dim(rotations: float) -> float:
        return rotary_dim * math.log(s.original_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s["beta_fast"] or 32), correction_dim(s["beta_slow"] or 1)
    if s["truncate"] is not False:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # as the reference does, to avoid dividing by zero
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp.to(inv.device)
    return inv / s["factor"] * (1 - extrapolation) + inv * extrapolation


def _llama3(inv: torch.Tensor, s: Scaling) -> torch.Tensor:
    factor, low_ff, high_ff, length = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s.original_length
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > length / low_ff, inv / factor, inv)
    smooth = (length / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= length / high_ff) & (wavelen <= length / low_ff)
    return torch.where(medium, smoothed, scaled)


@functools.lru_cache(maxsize=64)
def _negated_exponents(rotary_dim: int) -> torch.Tensor:
    """-2i / r for each pair i, float64 (read only: every caller makes new tensors from it)."""
    return -(torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def frequencies(
    scaling: Scaling | None, rotary_dim: int, theta: float, seq_len: int
) -> tuple[torch.Tensor, float]:
    """Float64 inverse frequencies (rotary_dim/2,) and the factor on cos and sin, for a sequence of
    ``seq_len`` tokens (which matters for ``dynamic`` and ``longrope`` alone)."""
    kind = scaling.rope_type if scaling else "default"
    if kind == "dynamic" and seq_len > scaling.original_length:
        factor = scaling["factor"]
        theta = theta * (factor * seq_len / scaling.original_length - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    inv = torch.pow(float(theta), _negated_exponents(rotary_dim))
    if kind == "linear":
        return inv / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv, scaling), 1.0
    if kind == "yarn":
        attention = scaling["attention_factor"]
        if attention is None:
            factor, mscale, mscale_all_dim = scaling["factor"], scaling["mscale"], scaling["mscale_all_dim"]
            if mscale and mscale_all_dim:
                attention = _get_mscale(factor, mscale) / _get_mscale(factor, mscale_all_dim)
            else:
                attention = _get_mscale(factor)
        return _yarn(inv, scaling, rotary_dim, theta), attention
    if kind == "longrope":
        long = seq_len > scaling.original_length
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64)
        attention = scaling["attention_factor"]
        if attention is None:
            factor = scaling["factor"]
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(scaling.original_length))
        return inv / ext, attention
    if kind == "proportional":
        fraction = scaling["partial_rotary_factor"]
        inv[int((1.0 if fraction is None else fraction) * rotary_dim // 2):] = 0.0
        return inv / (scaling["factor"] or 1.0), 1.0
    return inv, 1.0


def softmax_scale_factor(scaling: Scaling | None) -> float:
    """What YaRN with ``mscale_all_dim`` multiplies the attention's softmax scale by (DeepSeek): mscale^2."""
    if scaling is None or scaling.rope_type == "default" or not scaling["mscale_all_dim"]:
        return 1.0
    return _get_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
