"""dpvr: dual-path vision-token routing for HuggingFace LLaVA models."""
from dpvr.errors import DPVRError, NonFiniteError

__version__ = "0.1.0"
