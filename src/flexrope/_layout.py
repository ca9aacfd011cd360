"""Parsing a layout string and binding it to a tensor's shape.

A layout is an einops pattern over the axis names ``b`` (batch), ``h`` (heads), ``s`` (sequence) and ``d``
(head dim), with ``...`` for extra leading axes and parenthesised groups such as ``"b s (h d)"``. Parsing
happens once per (layout, axis lengths) and is cached; binding to a shape is cached per shape.

The canonical view that the rotation runs on is ``(*lead, b, h, s, d)``: the axes of ``...`` first, then
b, h, s, d, with a unit axis standing in for an absent ``b`` or ``h``. It is made by ``einops.rearrange``
from splits and a permutation only, so it is always a view of the tensor, never a copy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import einops
import torch

from ._errors import LayoutError

AXES = ("b", "h", "s", "d")
_AXES_HELP = "a layout names b (batch), h (heads), s (sequence), d (head dim), and ... for extra leading axes"
ELLIPSIS = "..."


@dataclass(frozen=True, eq=False)  # parse_layout makes one object per layout: identity is equality, and cheap
class Layout:
    """A parsed layout: its top-level entries (each a tuple of axis names) and the known axis lengths."""

    text: str
    entries: tuple[tuple[str, ...], ...]
    lengths: tuple[tuple[str, int], ...]
    to_canonical: str  # the einops pattern from this layout to the canonical (*lead, b, h, s, d) view
    permutation: tuple[int, ...] | None  # when the layout is a plain permutation of b h s d: the one to apply

    @property
    def has_ellipsis(self) -> bool:
        return (ELLIPSIS,) in self.entries

    def entry_of_dim(self, ndim: int) -> list[tuple[str, ...]]:
        """The layout entry each dim of an ``ndim``-dim tensor holds (``("...",)`` for the extra axes)."""
        out: list[tuple[str, ...]] = []
        for entry in self.entries:
            out.extend([entry] * (ndim - len(self.entries) + 1) if entry == (ELLIPSIS,) else [entry])
        return out

    def canonical(self, x: torch.Tensor) -> torch.Tensor:
        """The canonical ``(*lead, b, h, s, d)`` view of ``x``, as ``einops.rearrange`` makes it."""
        if self.permutation is not None:  # what einops does for a plain permutation, without its overhead
            return x if self.permutation == (0, 1, 2, 3) else x.permute(self.permutation)
        if torch.compiler.is_compiling():
            return einops.rearrange(x, self.to_canonical, **dict(self.lengths))
        # einops' view of a stand-in with x's geometry, once per geometry; then one as_strided per call
        shape, stride = _canonical_geometry(self, tuple(x.shape), tuple(x.stride()))
        return x.as_strided(shape, stride, x.storage_offset())


    def from_canonical(self, t: torch.Tensor) -> torch.Tensor:
        """``t``, of the canonical shape, laid out as this layout: a view where t's memory order allows it."""
        if self.permutation is not None:
            return t.permute([self.permutation.index(dim) for dim in range(4)])
        source, target = self.to_canonical.split(" -> ")
        return einops.rearrange(t, f"{target} -> {source}", **dict(self.lengths))


@functools.lru_cache(maxsize=1024)
def _canonical_geometry(layout: Layout, shape: tuple[int, ...], stride: tuple[int, ...]):
    stand_in = torch.empty_strided(shape, stride, device="meta")
    view = einops.rearrange(stand_in, layout.to_canonical, **dict(layout.lengths))
    return tuple(view.shape), tuple(view.stride())


@dataclass(frozen=True)
class Binding:
    """The lengths of b, s and d (1 where b is absent): what positions and tables are checked against."""

    b: int
    s: int
    d: int


def cached(fn):
    """``functools.lru_cache``, bypassed while torch.compile traces (it traces the function, not its cache)."""
    cache = functools.lru_cache(maxsize=1024)(fn)

    @functools.wraps(fn)
    def call(*args):
        return fn(*args) if torch.compiler.is_compiling() else cache(*args)

    call.cache_info = cache.cache_info
    return call


def _tokenize(text: str) -> list[str]:
    tokens, word = [], ""
    for char in text:
        if char in "() \t\n":
            if word:
                tokens.append(word)
                word = ""
            if char in "()":
                tokens.append(char)
        else:
            word += char
    if word:
        tokens.append(word)
    return tokens


def _entries(text: str) -> tuple[tuple[str, ...], ...]:
    entries: list[tuple[str, ...]] = []
    group: list[str] | None = None
    for token in _tokenize(text):
        if token == "(":
            if group is not None:
                raise LayoutError("groups cannot be nested: write one level of parentheses, as in 'b s (h d)'")
            group = []
        elif token == ")":
            if group is None:
                raise LayoutError("')' closes no group: the parentheses are unbalanced")
            if not group:
                raise LayoutError("'()' is an empty group: every group names at least one axis")
            entries.append(tuple(group))
            group = None
        elif group is not None:
            if token == ELLIPSIS:
                raise LayoutError("'...' cannot stand inside a group: it stands alone, for extra leading axes")
            group.append(token)
        else:
            entries.append((token,))
    if group is not None:
        raise LayoutError("'(' opens a group that is never closed: the parentheses are unbalanced")
    return tuple(entries)


@cached
def parse_layout(text: str, lengths: tuple[tuple[str, int], ...] = ()) -> Layout:
    """Parse ``text`` with the keyword lengths ``lengths`` (sorted (name, int) pairs); raise LayoutError."""
    if "," in text:
        raise LayoutError("axes should be separated with spaces, not commas, as in 'b s h d'")
    entries = _entries(text)
    names = [name for entry in entries for name in entry]
    for name in names:
        if name not in AXES and name != ELLIPSIS:
            hint = " (the sequence axis is s)" if name in ("t", "n", "l", "seq") else ""
            raise LayoutError(f"unknown axis {name!r}{hint}: {_AXES_HELP}")
    for name in set(names):
        if names.count(name) > 1:
            raise LayoutError(f"axis {name!r} appears {names.count(name)} times: each axis appears once")
    for required, meaning in (("s", "sequence"), ("d", "head dim")):
        if required not in names:
            raise LayoutError(f"the layout has no {required!r} ({meaning}) axis: {_AXES_HELP}")
    for entry in entries:
        if "s" in entry and "d" in entry:
            raise LayoutError(
                "'d' is grouped with 's': the head dim must be an axis of its own or grouped with heads, "
                "as in 'b s (h d)'"
            )
    for name, length in lengths:
        if name not in names:
            raise LayoutError(f"{name}={length} names an axis the layout does not have")
        if type(length) is not int or length < 1:  # noqa: E721 - bool is not a length
            raise LayoutError(f"{name}={length!r}: an axis length must be a positive int")
    known = dict(lengths)
    for entry in entries:
        unknown = [name for name in entry if name not in known]
        if len(entry) > 1 and len(unknown) > 1:
            missing = " or ".join(f"{name}=..." for name in unknown)
            raise LayoutError(
                f"group ({' '.join(entry)}) needs the lengths of all its axes but one: pass {missing}"
            )
    text = " ".join(f"({' '.join(entry)})" if len(entry) > 1 else entry[0] for entry in entries)
    lead = [ELLIPSIS] if (ELLIPSIS,) in entries else []
    target = " ".join(lead + [axis if axis in names else "1" for axis in AXES])
    plain = len(entries) == 4 and all(len(entry) == 1 and entry[0] in AXES for entry in entries)
    permutation = tuple(entries.index((axis,)) for axis in AXES) if plain else None
    return Layout(text, entries, lengths, to_canonical=f"{text} -> {target}", permutation=permutation)


@cached
def bind(layout: Layout, shape: tuple[int, ...]) -> Binding:
    """The axis lengths of a tensor of ``shape`` laid out as ``layout``; raise LayoutError if it does not fit."""
    named = [entry for entry in layout.entries if entry != (ELLIPSIS,)]
    if len(shape) != len(named) and not (layout.has_ellipsis and len(shape) >= len(named)):
        expected = f"at least {len(named)}" if layout.has_ellipsis else str(len(named))
        raise LayoutError(
            f"the layout {layout.text!r} describes {expected} dims but the tensor has {len(shape)}: "
            f"declare one axis name per dim of x"
        )
    lead_len = len(shape) - len(named)
    lengths = dict(layout.lengths)
    sizes: dict[str, int] = {}
    dim = 0
    for entry in layout.entries:
        if entry == (ELLIPSIS,):
            dim += lead_len
            continue
        size = shape[dim]
        known, unknown = 1, []
        for name in entry:
            if name in lengths:
                known *= lengths[name]
            else:
                unknown.append(name)
        where = f"dim {dim} (axis {'(' + ' '.join(entry) + ')' if len(entry) > 1 else entry[0]})"
        if unknown:
            if size % known:
                raise LayoutError(f"{where} has length {size}, not divisible by {known}")
            lengths[unknown[0]] = size // known
        elif known != size:
            given = ", ".join(f"{name}={lengths[name]}" for name in entry)
            raise LayoutError(f"{where} has length {size} but {given} was given")
        sizes.update({name: lengths[name] for name in entry})
        dim += 1
    return Binding(**{axis: sizes.get(axis, 1) for axis in "bsd"})
