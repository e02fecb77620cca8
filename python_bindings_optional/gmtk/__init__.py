"""gmtk: gradient-mask tuning kernels.

The C API of gmtk (include/gmtk/gmtk.h) on DLPack arrays: numpy arrays on the
CPU reference backend, torch / CuPy / JAX arrays on the CUDA backend. Drop-in
torch optimizers live in :mod:`gmtk.torch` (imported on demand). See
docs/python.md in the repository.
"""

from ._gmtk import (
    Backend,
    Comm,
    CudaError,
    DeviceUnavailableError,
    Dtype,
    Error,
    GradientReduction,
    GroupConfig,
    Handle,
    InsufficientWorkspaceError,
    InternalError,
    InvalidArgumentError,
    MaskMode,
    NotSupportedError,
    Optimizer,
    OutOfMemoryError,
    Plan,
    Scope,
    Status,
    Tensor,
    __version__,
    library_version,
)

__all__ = [
    "Backend",
    "Comm",
    "CudaError",
    "DeviceUnavailableError",
    "Dtype",
    "Error",
    "GradientReduction",
    "GroupConfig",
    "Handle",
    "InsufficientWorkspaceError",
    "InternalError",
    "InvalidArgumentError",
    "MaskMode",
    "NotSupportedError",
    "Optimizer",
    "OutOfMemoryError",
    "Plan",
    "Scope",
    "Status",
    "Tensor",
    "__version__",
    "library_version",
]
