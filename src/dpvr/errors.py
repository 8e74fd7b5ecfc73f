"""One exception type for every user-facing failure, so the CLI can print it as one line."""


class DPVRError(ValueError):
    """Bad input, config or checkpoint. The message is one line that names the problem
    (and the sample id, layer index or config field it concerns)."""


class NonFiniteError(DPVRError, FloatingPointError):
    """A layer produced NaN or inf (for example fp16 overflow); the message names the layer."""


class UnsupportedInput(DPVRError, NotImplementedError):
    """An input routing cannot serve exactly where the stock model could (output_attentions of an image prompt)."""


class UsageError(DPVRError):
    """A command-line option value or combination that cannot work; the CLI exits 2 for it, as argparse does."""


class DPVRWarning(UserWarning):
    """Something runs but is probably not what was meant (an untrained side branch, say); the CLI prints
    it as one line."""
