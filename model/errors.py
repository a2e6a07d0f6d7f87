"""Named errors of the artifact format, the model repository and the inference engine.

Every error says what was wrong and what was expected. The service maps these classes to HTTP
statuses in one table; nothing here knows about HTTP.
"""

from __future__ import annotations


class BnnError(Exception):
    """Base class of every error bnnserve raises on purpose."""


# --- artifact file -------------------------------------------------------------------------------
class ArtifactError(BnnError):
    """An artifact file cannot be used; the subclass says why."""


class NotSafetensorsError(ArtifactError):
    """The file does not start with a safetensors header (length prefix + JSON object)."""


class TruncatedArtifactError(ArtifactError):
    """The file ends before the header or a tensor's bytes end."""


class HeaderTooLargeError(ArtifactError):
    """The declared header length exceeds the reader's limit."""


class UnsupportedFormatVersionError(ArtifactError):
    """The artifact's format name or version is not one this reader understands."""


class InvalidSpecError(ArtifactError):
    """The layer graph or metadata is malformed (bad field, inconsistent widths...)."""


class UnknownLayerError(InvalidSpecError):
    """A layer names a kind this version does not know."""


class GraphError(InvalidSpecError):
    """The layer graph (format v2's ``inputs``) is not a well-formed DAG in topological order."""


class DanglingInputError(GraphError):
    """A layer takes its input from a name that is neither a layer nor the model input."""


class GraphCycleError(GraphError):
    """A layer takes its input from itself or a later layer: a cycle, or not topological order."""


class UnusedLayerError(GraphError):
    """A layer's output feeds nothing and it is not the graph's output (a dead branch)."""


class ShapeMismatchError(GraphError):
    """The inputs of an ``add`` or ``concat`` do not fit together."""


class GraphTooLargeError(GraphError):
    """The graph has more layers, or a layer more inputs, than a reader accepts
    (:data:`model.spec.MAX_LAYERS`, :data:`model.spec.MAX_LAYER_INPUTS`)."""


class FormatVersionError(InvalidSpecError):
    """A v1 document uses a v2 feature (a graph ``inputs`` field or a v2 layer kind)."""


class UnknownQuantizerError(InvalidSpecError):
    """A layer names a quantizer that is not registered."""


class MissingTensorError(ArtifactError):
    """A tensor the layer graph needs is not in the file."""


class TensorShapeError(ArtifactError):
    """A tensor's shape differs from what the layer graph implies."""


class TensorDtypeError(ArtifactError):
    """A tensor's dtype differs from what the layer graph implies."""


class ChecksumMismatchError(ArtifactError):
    """A tensor's or file's bytes do not match the recorded sha256."""


class HeaderTooDeepError(NotSafetensorsError):
    """The JSON header (or the metadata document in it) nests deeper than the reader allows."""


class DimensionTooLargeError(InvalidSpecError):
    """A size in the layer graph or input shape exceeds the largest the engine indexes."""


class InvalidInputShapeError(InvalidSpecError):
    """``input.shape`` is not a non-empty list of positive integers."""


class InvalidValueRangeError(InvalidSpecError):
    """``input.value_range`` is not null or ``[low, high]`` of finite numbers with low ≤ high."""


class InvalidLabelsError(InvalidSpecError):
    """``labels`` is not a list of distinct, non-empty strings."""


# --- model content (valid container and graph, poisonous numbers) ------------------------------
class ModelContentError(ArtifactError):
    """The file is well-formed but its numbers would make the model answer wrongly."""


class NonFiniteTensorError(ModelContentError):
    """A float tensor holds NaN or ±infinity."""


class InvalidBatchNormError(ModelContentError):
    """A BatchNorm has a negative ``running_var``, an ``eps`` that is not finite and > 0, or
    statistics that fold into non-finite per-channel coefficients."""


class ModelTooLargeError(ModelContentError):
    """The model's weights plus activations at the largest allowed batch exceed the memory
    limit (``BNN_MAX_MODEL_MEMORY_BYTES``)."""


class NonFiniteOutputError(ModelContentError):
    """The model produced NaN or ±infinity on the warm-up batch."""


# --- model repository ----------------------------------------------------------------------------
class RepositoryError(BnnError):
    """The model repository is unusable or an operation on it failed."""


class InvalidModelNameError(RepositoryError):
    """A model name contains characters outside [A-Za-z0-9._-] or a path component like '..'."""


class ModelNotFoundError(RepositoryError):
    """No such model, or no such version of it, in the repository."""


class ManifestError(RepositoryError):
    """A version directory's manifest is missing, malformed or disagrees with the files."""


class VersionLimitError(RepositoryError):
    """Publishing would need a version number above the largest one the repository lists."""


class UnsafeRepositoryEntryError(RepositoryError):
    """A repository entry is not what a reader may open; the subclass says why."""


class NotARegularFileError(UnsafeRepositoryEntryError):
    """A file to read is a FIFO, socket, device or directory instead of a regular file."""


class LinkOutsideRepositoryError(UnsafeRepositoryEntryError):
    """A symbolic link (of a version directory or a file) resolves outside the repository."""


# --- inference -----------------------------------------------------------------------------------
class InvalidInputError(BnnError):
    """An input tensor has the wrong shape, dtype or values (NaN, infinity)."""


class InputOutOfRangeError(InvalidInputError):
    """Finite input values drove the model's logits to NaN or infinity (far outside the
    ``value_range`` the model was validated on)."""


class DeviceUnavailableError(BnnError):
    """The requested device (e.g. 'cuda') is not available on this machine."""


class ModelMemoryError(BnnError):
    """A model would need more device memory (weights plus one call's peak) than its limit."""
