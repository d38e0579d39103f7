"""GradiVeQ: bandwidth-efficient gradient aggregation with a linear, summable PCA compressor.

The compiled core lives in ``gradiveq._C``; this package re-exports it.
"""

import torch  # noqa: F401  (loads libtorch before the extension, which links against it)
import torch.distributed  # noqa: F401  (registers c10d's pybind11 types the extension accepts)


def _check_build():
    """The extension must come from a build against the torch that is imported: a module built against another
    torch fails with undefined symbols at best."""
    try:
        from gradiveq import _build_info
    except ImportError:
        raise ImportError("gradiveq: this package has no compiled core (gradiveq._C); install it with "
                          "`pip install --no-build-isolation <path to the gradiveq repository>`, or build it in "
                          "place with `make build`") from None
    have = torch.__version__.split("+")[0]
    if have != _build_info.TORCH_VERSION:
        raise ImportError(f"gradiveq: gradiveq._C was built against torch {_build_info.TORCH_VERSION}, but torch "
                          f"{torch.__version__} is installed; rebuild it against this torch with `pip install "
                          f"--no-build-isolation --force-reinstall <path to the gradiveq repository>`")


_check_build()

from gradiveq.state import (  # noqa: E402
    CASQState,
    CO3State,
    GradiVeQState,
    QsgdState,
    casq_hook,
    co3_hook,
    hook,
    register_hook,
)
from gradiveq._C import (  # noqa: E402
    CasqCodec,
    Co3Codec,
    ConvSliceLayout,
    InvalidArgument,
    PcaCompressor,
    Phase,
    QsgdCodec,
    QsgdNorm,
    Schedule,
    __version__,
    cuda_kernels_built,
    cuda_kernels_enabled,
    set_cuda_kernels_enabled,
)

__all__ = [
    "GradiVeQState",
    "QsgdState",
    "CO3State",
    "CASQState",
    "hook",
    "co3_hook",
    "casq_hook",
    "register_hook",
    "CasqCodec",
    "Co3Codec",
    "ConvSliceLayout",
    "InvalidArgument",
    "PcaCompressor",
    "Phase",
    "QsgdCodec",
    "QsgdNorm",
    "Schedule",
    "__version__",
    "cuda_kernels_built",
    "cuda_kernels_enabled",
    "set_cuda_kernels_enabled",
]
