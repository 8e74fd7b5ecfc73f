"""One exception type for every user-facing failure, so the CLI can print it as one line."""


class DPVRError(ValueError):
    """Bad input, config or checkpoint. The message is one line that names the problem
    (and the sample id, layer index or config field it concerns)."""


class NonFiniteError(DPVRError, FloatingPointError):
    """A layer produced NaN or inf (for example fp16 overflow); the message names the layer."""
