"""The exceptions flexrope raises for bad input."""


class FlexRopeError(ValueError):
    """Bad input to flexrope: the message names what was passed, what was expected and how to fix it."""


class LayoutError(FlexRopeError):
    """The layout string, or its binding to the shape of a tensor, is wrong."""
