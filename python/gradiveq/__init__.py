"""GradiVeQ: bandwidth-efficient gradient aggregation with a linear, summable PCA compressor.

The compiled core lives in ``gradiveq._C``; this package re-exports it.
"""

import torch  # noqa: F401  (loads libtorch before the extension, which links against it)
import torch.distributed  # noqa: F401  (registers c10d's pybind11 types the extension accepts)

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
]
