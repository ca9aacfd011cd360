"""``python -m flexrope plot``: the wavelength of every channel pair under each scaling recipe, as a PNG."""

from __future__ import annotations

import json
import math

from ._errors import FlexRopeError
from ._hf_config import settings_from_hf_config
from ._scaling import frequencies, parse_scaling


def recipes(factor: float, original: int) -> dict[str, dict | None]:
    """One recipe of each kind that needs no per-dimension lists, at this factor and original length."""
    return {
        "default": None,
        "linear": {"rope_type": "linear", "factor": factor},
        f"dynamic (at {int(factor * original)} tokens)": {
            "rope_type": "dynamic", "factor": factor, "original_max_position_embeddings": original},
        "llama3": {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": original},
        "yarn": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original},
    }


def plot(out: str, *, head_dim: int, theta: float, factor: float, original: int, config: str | None) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FlexRopeError("plotting needs matplotlib: pip install 'flexrope[plot]'") from None
    curves = recipes(factor, original)
    rotary_dim = head_dim
    title = f"head_dim {head_dim}, theta {theta:g}, factor {factor:g}, original length {original}"
    if config is not None:
        with open(config) as file:
            settings = settings_from_hf_config(json.load(file))
        head_dim, rotary_dim, theta = settings["head_dim"], settings["rotary_dim"], settings["theta_base"]
        scaling = settings["scaling"]
        if scaling is not None:
            original = scaling.get("original_max_position_embeddings", original)
            curves = recipes(scaling.get("factor") or factor, original)
            curves[f"this config ({scaling.get('rope_type', scaling.get('type'))})"] = scaling
        title = f"{config}: rotary_dim {rotary_dim}, theta {theta:g}, original length {original}"
    figure, axis = plt.subplots(figsize=(8, 5))
    for label, scaling in curves.items():
        recipe = parse_scaling(scaling, rotary_dim=rotary_dim, head_dim=head_dim, theta_base=theta)
        length = int((recipe["factor"] or 1) * original) if recipe and recipe.length_dependent else original
        inv, _ = frequencies(recipe, rotary_dim, theta, length)
        axis.plot(range(rotary_dim // 2), (2 * math.pi / inv).tolist(), label=label, marker=".", markersize=3)
    axis.axhline(original, color="grey", linestyle="--", linewidth=1, label=f"original length {original}")
    axis.set_yscale("log")
    axis.set_xlabel("channel pair i")
    axis.set_ylabel("wavelength 2π / inv_freq (tokens)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def _channel_axes(rope) -> list[str]:
    """The axis of every channel of a MultiAxisRotaryEmbedding's rotary dim, in channel order."""
    names, half = list(rope.axes), rope.rotary_dim // 2
    pair_of = (lambda c: c // 2) if rope.interleaved else (lambda c: c % half)
    return [names[rope.pair_axes[pair_of(c)]] for c in range(rope.rotary_dim)]


def plot_axes(out: str, *, head_dim: int = 128) -> str:
    """One row per multi-axis preset: which axis every channel of a head turns with."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError:
        raise FlexRopeError("plotting needs matplotlib: pip install 'flexrope[plot]'") from None
    from . import presets
    from ._multiaxis import MultiAxisRotaryEmbedding

    qwen2 = MultiAxisRotaryEmbedding.from_hf_config({"model_type": "qwen2_vl", "head_dim": head_dim,
                                                    "max_position_embeddings": 16})
    qwen3 = MultiAxisRotaryEmbedding.from_hf_config({"model_type": "qwen3_vl", "head_dim": head_dim,
                                                    "max_position_embeddings": 16})
    rows = {
        "Qwen2-VL / 2.5-VL text (sections)": qwen2,
        "Qwen3-VL text (round robin)": qwen3,
        "Flux (interleaved, per axis)": presets.flux(context_length=16),
        "Wan (interleaved, per axis)": presets.wan(head_dim, context_length=16),
        "Pixtral (half-split)": presets.pixtral(head_dim, context_length=16),
        "Qwen2-VL vision (half-split)": presets.qwen2_vl_vision(head_dim, context_length=16),
    }
    palette = {"t": "#4c72b0", "f": "#4c72b0", "y": "#dd8452", "x": "#55a868"}
    codes = {"t": 0, "f": 0, "y": 1, "x": 2}
    grid = [[codes[a] for a in _channel_axes(rope)] for rope in rows.values()]
    figure, axis = plt.subplots(figsize=(11, 3.2))
    axis.imshow(grid, aspect="auto", interpolation="nearest",
                cmap=ListedColormap([palette["t"], palette["y"], palette["x"]]), vmin=0, vmax=2)
    axis.set_yticks(range(len(rows)), list(rows), fontsize=8)
    axis.set_xlabel(f"channel of a head of {head_dim} (half-split: pair i is channels i and i + {head_dim // 2}; "
                    f"interleaved: 2i and 2i + 1)", fontsize=8)
    for name, label in (("t", "time / frames (t, f)"), ("y", "rows (y)"), ("x", "columns (x)")):
        axis.bar(0, 0, color=palette[name], label=label)
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.22), ncol=3)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
