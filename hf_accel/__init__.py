"""hf_accel: faster Hugging Face generate() for any causal LM.

``import hf_accel`` adds ``accel=`` / ``accel_kwargs=`` to ``model.generate`` (and so to pipelines);
nothing else changes until a method is selected.
"""

from . import adapters as _adapters  # noqa: F401  (registers the methods)
from .integrations.artifacts import ArtifactError
from .config import AccelConfig, set_generation_config
from .default_model import load_default
from .engine import AccelStats, SpeculativeAdapter, Tree
from .engine.backends import release_workspaces
from .hook import install, installed, stats, uninstall
from .registry import available, register

__version__ = "0.1.0"

install()

__all__ = [
    "AccelConfig",
    "ArtifactError",
    "AccelStats",
    "SpeculativeAdapter",
    "Tree",
    "available",
    "install",
    "installed",
    "load_default",
    "register",
    "release_workspaces",
    "set_generation_config",
    "stats",
    "uninstall",
]
