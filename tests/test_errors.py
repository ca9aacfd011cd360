"""Every class of bad input raises FlexRopeError (or LayoutError) saying what was passed and what to do."""

import pytest
import torch

from flexrope import FlexRopeError, LayoutError, compute_rope, precompute_rope_params

COS, SIN = precompute_rope_params(16, context_length=32)
X = torch.randn(2, 3, 5, 16)  # (b h s d)


def rope(x=X, cos=COS, sin=SIN, layout="b h s d", **kwargs):
    return compute_rope(x, cos, sin, layout, **kwargs)


LAYOUT_CASES = [
    ("unknown axis", dict(layout="b h t d"), r"unknown axis 't' \(the sequence axis is s\)"),
    ("duplicate axis", dict(layout="b s s d"), r"axis 's' appears 2 times"),
    ("missing s", dict(layout="b h x d"), r"unknown axis 'x'"),
    ("missing sequence", dict(layout="b h d", x=X[0]), r"has no 's' \(sequence\) axis"),
    ("missing head dim", dict(layout="b h s", x=X[..., 0]), r"has no 'd' \(head dim\) axis"),
    ("commas", dict(layout="b, h, s, d"), "separated with spaces, not commas"),
    ("rank mismatch", dict(layout="b s d"), r"describes 3 dims but the tensor has 4"),
    ("rank below ellipsis", dict(layout="... b h s d", x=X[0]), r"describes at least 4 dims but the tensor has 3"),
    ("keyword length mismatch", dict(layout="b h s d", h=4), r"dim 1 \(axis h\) has length 3 but h=4 was given"),
    ("keyword for absent axis", dict(layout="b h s d", n=4), r"n=4 names an axis the layout does not have"),
    ("keyword not an int", dict(layout="b h s d", h=3.0), r"h=3.0: an axis length must be a positive int"),
    ("d grouped with s", dict(layout="b h (s d)", x=X.flatten(2), s=5), r"'d' is grouped with 's'"),
    ("group needs lengths", dict(layout="b s (h d)", x=X.transpose(1, 2).flatten(2)), r"pass h=\.\.\. or d=\.\.\."),
    ("group not divisible", dict(layout="b s (h d)", x=X.transpose(1, 2).flatten(2), h=5), "not divisible by 5"),
    ("unbalanced", dict(layout="b s (h d"), "never closed"),
    ("nested", dict(layout="b s ((h) d)"), "cannot be nested"),
    ("empty group", dict(layout="b h s d ()"), "empty group"),
    ("ellipsis in group", dict(layout="(... b) h s d"), "cannot stand inside a group"),
    ("not a string", dict(layout=["b", "h", "s", "d"]), "expected a string"),
]


@pytest.mark.parametrize("kwargs, match", [case[1:] for case in LAYOUT_CASES], ids=[c[0] for c in LAYOUT_CASES])
def test_layout_errors(kwargs, match):
    with pytest.raises(LayoutError, match=match) as info:
        rope(**kwargs)
    assert "compute_rope(" in str(info.value) and "layout=" in str(info.value)


OTHER_CASES = [
    ("odd head dim", dict(x=torch.randn(1, 1, 5, 15)), "head dim 15 is odd"),
    ("odd rotary_dim", dict(rotary_dim=7), "rotary_dim=7 is odd"),
    ("rotary_dim past head dim", dict(rotary_dim=18), "rotary_dim=18 is larger than the head dim 16"),
    ("table width fits nothing", dict(cos=COS[:, :6], sin=SIN[:, :6]), r"tables of width 6 fit neither rotary_dim=16"),
    ("ambiguous half width", dict(cos=COS[:, :8], sin=SIN[:, :8]), r"ambiguous: pass rotary_dim=16 .* or rotary_dim=8"),
    ("cos/sin shapes disagree", dict(sin=SIN[:16]), r"cos has shape \(32, 16\) but sin has \(16, 16\)"),
    ("cos/sin devices disagree", dict(sin=SIN.to("meta")), r"cos is on cpu but sin is on meta"),
    ("x and tables on other devices", dict(cos=COS.to("meta"), sin=SIN.to("meta")),
     r"x is on cpu but the tables are on meta"),
    ("table 4-D", dict(cos=COS[None, None], sin=SIN[None, None]),
     r"cos is a torch.float32 tensor of shape \(1, 1, 32, 16\)"),
    ("per-token tables of the wrong length", dict(cos=COS[None], sin=SIN[None]),
     r"per-token tables of shape \(1, 32, 16\): expected \(1, 5, width\) or \(2, 5, width\)"),
    ("per-token tables with positions", dict(cos=COS[None, :5], sin=SIN[None, :5], offset=2),
     "per-token tables .* already hold each token's angles: drop positions= and offset="),
    ("seq past the table", dict(x=torch.randn(1, 1, 40, 16)), r"40 positions, past the table's 32 positions"),
    ("offset past the table", dict(offset=30), r"offset 30 \+ sequence length 5 = 35 positions"),
    ("negative offset", dict(offset=-1), "offset=-1: positions must be >= 0"),
    ("positions past the table", dict(positions=torch.tensor([0, 1, 2, 3, 32])),
     "reach position 32, past the table's 32"),
    ("negative positions", dict(positions=torch.tensor([0, 1, -2, 3, 4])),
     "hold position -2: positions must be >= 0"),
    ("positions of wrong length", dict(positions=torch.arange(4)),
     r"positions of shape \(4,\): expected \(5,\) or \(2, 5\)"),
    ("positions of wrong batch", dict(positions=torch.zeros(3, 5, dtype=torch.long)),
     r"positions of shape \(3, 5\)"),
    ("float positions", dict(positions=torch.arange(5.0)),
     "positions of type torch.float32: expected an integer tensor"),
    ("list positions", dict(positions=[0, 1, 2, 3, 4]), "positions of type list"),
    ("positions and offset", dict(positions=torch.arange(5), offset=2), "both positions and offset were given"),
    ("float offset", dict(offset=1.5), r"offset=1.5: expected an int"),
    ("offset tensor of wrong batch", dict(offset=torch.tensor([1, 2, 3])), r"integer tensor of shape \(2,\)"),
    ("integer x", dict(x=torch.ones(2, 3, 5, 16, dtype=torch.long)),
     "x has dtype torch.int64: expected a real floating"),
    ("complex x", dict(x=torch.ones(2, 3, 5, 16, dtype=torch.complex64)), "x has dtype torch.complex64"),
    ("x not a tensor", dict(x=[[1.0]]), "x is a list: expected a torch.Tensor"),
]


@pytest.mark.parametrize("kwargs, match", [case[1:] for case in OTHER_CASES], ids=[c[0] for c in OTHER_CASES])
def test_input_errors(kwargs, match):
    with pytest.raises(FlexRopeError, match=match) as info:
        rope(**kwargs)
    assert str(info.value).startswith("compute_rope(")


TABLE_CASES = [
    (dict(head_dim=15), "head dim 15 is odd"),
    (dict(head_dim=0), "head_dim=0: expected a positive int"),
    (dict(head_dim=16, rotary_dim=32), "rotary_dim=32 is larger than the head dim 16"),
    (dict(head_dim=16, rotary_dim=6.0), r"rotary_dim=6.0: expected a positive int"),
    (dict(head_dim=16, context_length=0), "context_length=0: expected a positive int"),
    (dict(head_dim=16, theta_base=float("inf")), "theta_base=inf: expected a finite number"),
    (dict(head_dim=16, dtype=torch.int32), "dtype=torch.int32: expected a floating torch dtype"),
    (dict(head_dim=16, scaling={"rope_type": "nope"}), "scaling rope_type 'nope' is unknown"),
]


@pytest.mark.parametrize("kwargs, match", [case for case in TABLE_CASES], ids=[str(c[0]) for c in TABLE_CASES])
def test_table_errors(kwargs, match):
    with pytest.raises(FlexRopeError, match=match) as info:
        precompute_rope_params(**kwargs)
    assert str(info.value).startswith("precompute_rope_params(")


def test_errors_are_value_errors_and_layout_errors_are_flexrope_errors():
    assert issubclass(FlexRopeError, ValueError) and issubclass(LayoutError, FlexRopeError)


def test_failed_call_leaves_x_untouched():
    x = X.clone()
    with pytest.raises(FlexRopeError):
        compute_rope(x, COS, SIN, offset=40, inplace=True)
    assert torch.equal(x, X)


MORE_CASES = [
    ("float8 x", dict(x=torch.zeros(2, 3, 5, 16, dtype=torch.float8_e4m3fn)), "float8 is a storage format"),
    ("meta positions", dict(positions=torch.arange(5, device="meta")), "positions is on the meta device"),
    ("meta offset", dict(offset=torch.tensor([1, 2], device="meta")), "offset is on the meta device"),
    ("misspelled inplace", dict(in_place=True), r"unknown keyword in_place=: did you mean inplace=\?"),
    ("misspelled positions", dict(position=torch.arange(5)), r"unknown keyword position=: did you mean positions=\?"),
    ("bool offset", dict(offset=True), r"offset=True: expected an int"),
]


@pytest.mark.parametrize("kwargs, match", [case[1:] for case in MORE_CASES], ids=[c[0] for c in MORE_CASES])
def test_more_input_errors(kwargs, match):
    with pytest.raises(FlexRopeError, match=match):
        rope(**kwargs)


def test_meta_x_with_meta_positions_gives_the_shape():
    x = torch.empty(2, 3, 5, 16, device="meta")
    out = compute_rope(x, COS.to("meta"), SIN.to("meta"), positions=torch.empty(5, dtype=torch.long, device="meta"))
    assert out.shape == x.shape and out.device.type == "meta"


IN_PLACE_CASES = [
    ("view of a leaf that requires grad",
     lambda: torch.randn(2, 3, 5, 32, requires_grad=True)[..., :16], "a view of a leaf tensor that requires grad"),
    ("overlapping elements", lambda: torch.randn(200).as_strided((2, 3, 5, 16), (0, 16, 8, 1)), "overlap in memory"),
    ("expanded", lambda: torch.randn(1, 3, 5, 16).expand(2, 3, 5, 16), "overlap in memory"),
]


@pytest.mark.parametrize("make, match", [case[1:] for case in IN_PLACE_CASES], ids=[c[0] for c in IN_PLACE_CASES])
def test_in_place_refused_before_anything_is_written(make, match):
    x = make()
    before = x.detach().clone()
    with pytest.raises(FlexRopeError, match=match):
        compute_rope(x, COS, SIN, inplace=True)
    assert torch.equal(x.detach(), before)


def test_inference_tensor_in_place_outside_inference_mode_is_refused_untouched():
    with torch.inference_mode():
        x = torch.randn(2, 3, 5, 16)
    before = x.clone()
    with pytest.raises(FlexRopeError, match="inference tensor outside inference_mode"):
        compute_rope(x, COS, SIN, inplace=True)
    assert torch.equal(x, before)
    with torch.inference_mode():
        assert compute_rope(x, COS, SIN, inplace=True) is x


def test_overlap_refused_only_in_place():
    x = torch.randn(1, 3, 5, 16).expand(2, 3, 5, 16)
    assert torch.equal(compute_rope(x, COS, SIN), compute_rope(x.contiguous(), COS, SIN))


def test_full_width_tables_whose_halves_differ_are_refused():
    """A full-width table is read as cat((angles, angles)); GPT-J's and Meta-style tables repeat each angle side
    by side instead, and would turn most pairs by another pair's angle. They are refused with what to pass, the
    half-width table they spread out then gives the right rotation, and an in-place edit of a table that passed
    is seen on the next call."""
    d, n = 8, 12
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq
    cos_spread, sin_spread = (f(angles).repeat_interleave(2, -1).float() for f in (torch.cos, torch.sin))
    x = torch.randn(1, n, 2, d)
    with pytest.raises(FlexRopeError, match=r"halves of the full-width cos table differ.*cos\[\.\.\., ::2\]"):
        compute_rope(x, cos_spread, sin_spread, "b s h d", interleaved=True)
    got = compute_rope(x, cos_spread[:, ::2], sin_spread[:, ::2], "b s h d", interleaved=True, rotary_dim=d)
    a, b = x[..., 0::2].double(), x[..., 1::2].double()
    c, s = torch.cos(angles)[None, :, None], torch.sin(angles)[None, :, None]
    expected = torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)

    cos, sin = precompute_rope_params(d, context_length=n)
    compute_rope(x, cos, sin, "b s h d")  # checked once, then remembered
    cos[3, d - 1] += 0.5
    with pytest.raises(FlexRopeError, match=f"column {d // 2 - 1}"):
        compute_rope(x, cos, sin, "b s h d")
