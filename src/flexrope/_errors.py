"""The exceptions flexrope raises for bad input, and its warnings."""

import os
import sys
import warnings

import torch

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


class FlexRopeError(ValueError):
    """Bad input to flexrope: the message names what was passed, what was expected and how to fix it."""


class LayoutError(FlexRopeError):
    """The layout string, or its binding to the shape of a tensor, is wrong."""


def described(value: object) -> str:
    """What was passed where a tensor was expected, for an error message: "float32 tensor of shape (3,)", or the
    type's name."""
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def warn(message: str, category: type[Warning]) -> None:
    """Warn at the caller's line: the first frame outside flexrope (and outside torch's module machinery)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE) or f"{os.sep}torch{os.sep}" in frame.f_code.co_filename
    ):
        level, frame = level + 1, frame.f_back
    warnings.warn(f"flexrope: {message}", category, stacklevel=level + 1)
