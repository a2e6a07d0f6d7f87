"""bnnserve's training package: STE quantizers, binary layers, architectures, training, export.

Submodules are imported on use (``from training.architectures import build_model``), so that
importing the package costs nothing beyond Python itself. The artifact file written by
:mod:`training.export` is the only contract with the serving side.
"""
