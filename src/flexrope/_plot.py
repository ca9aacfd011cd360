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
