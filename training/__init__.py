"""bnnserve's training package: STE quantizers, binary layers, architectures, training, export.

Submodules are imported on use (``from training.architectures import build_model``), so that
importing the package costs nothing beyond Python itself. The artifact file written by
:mod:`training.export` is the only contract with the serving side.
"""

from importlib import import_module
from typing import Any

# The training API's main names, re-exported lazily: ``from training import TrainConfig, train``.
_LAZY_EXPORTS = {
    "TrainConfig": "training.config",
    "TrainResult": "training.loop",
    "evaluate": "training.loop",
    "train": "training.loop",
    "publish_result": "training.publish",
}
__all__ = sorted(_LAZY_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _LAZY_EXPORTS:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    return getattr(import_module(_LAZY_EXPORTS[name]), name)
