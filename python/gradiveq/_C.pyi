# Type stubs of gradiveq._C, the compiled core (python/bindings.cpp). Defaults shown as `...` come from the C++
# option structs (include/gradiveq/options.h).
from typing import ClassVar, Dict, List, Sequence, Tuple

import torch

__version__: str

class InvalidArgument(ValueError): ...

class ConvSliceLayout:
    filters: int
    depth: int
    height: int
    width: int
    slice_len: int
    @staticmethod
    def for_weight(weight_shape: Sequence[int], slice_len: int = 0) -> ConvSliceLayout: ...
    @staticmethod
    def kernel_position(weight_shape: Sequence[int]) -> ConvSliceLayout: ...
    @property
    def numel(self) -> int: ...
    @property
    def num_slices(self) -> int: ...
    @property
    def tail_len(self) -> int: ...
    def to_paper_order(self, weight_grad: torch.Tensor) -> torch.Tensor: ...
    def from_paper_order(self, flat: torch.Tensor) -> torch.Tensor: ...
    def slices(self, paper_flat: torch.Tensor) -> torch.Tensor: ...
    def tail(self, paper_flat: torch.Tensor) -> torch.Tensor: ...

class PcaCompressor:
    def __init__(self) -> None: ...
    @staticmethod
    def fit(samples: torch.Tensor, energy: float = ..., max_components: int = ..., target_ratio: float = ...,
            min_ratio: float = ...) -> PcaCompressor: ...
    @property
    def is_fitted(self) -> bool: ...
    @property
    def slice_len(self) -> int: ...
    @property
    def num_components(self) -> int: ...
    @property
    def num_samples(self) -> int: ...
    @property
    def compression_ratio(self) -> float: ...
    @property
    def explained_variance(self) -> float: ...
    @property
    def mean(self) -> torch.Tensor: ...
    @property
    def basis(self) -> torch.Tensor: ...
    @property
    def eigenvalues(self) -> torch.Tensor: ...
    def compress(self, slices: torch.Tensor, world_size: int = 1) -> torch.Tensor: ...
    def decompress(self, coeffs: torch.Tensor) -> torch.Tensor: ...
    def serialize(self) -> torch.Tensor: ...
    @staticmethod
    def deserialize(data: torch.Tensor) -> PcaCompressor: ...
    def checksum(self) -> int: ...

class QsgdNorm:
    max: ClassVar[QsgdNorm]
    l2: ClassVar[QsgdNorm]
    name: str

class QsgdCodec:
    def __init__(self, levels: int = ..., bucket_size: int = ..., norm: str = "max") -> None: ...
    @property
    def bits_per_value(self) -> int: ...
    def packed_bytes(self, numel: int) -> int: ...
    def encode(self, values: torch.Tensor, seed: int) -> torch.Tensor: ...
    def decode(self, packed: torch.Tensor, numel: int) -> torch.Tensor: ...

class Co3Codec:
    def __init__(self, format: str = "fp4") -> None: ...
    @property
    def grid(self) -> torch.Tensor: ...
    @property
    def header_bytes(self) -> int: ...
    def fit_scale(self, values: torch.Tensor) -> float: ...
    def encode(self, values: torch.Tensor) -> torch.Tensor: ...
    def decode(self, packed: torch.Tensor, numel: int) -> torch.Tensor: ...

class CasqCodec:
    def __init__(self, bits: int = ..., clusters: int = ..., bucket_size: int = ...) -> None: ...
    def packed_bytes(self, numel: int) -> int: ...
    def bits_per_element(self, numel: int) -> float: ...
    def encode(self, values: torch.Tensor, seed: int) -> torch.Tensor: ...
    def decode(self, packed: torch.Tensor, numel: int) -> torch.Tensor: ...

class Phase:
    warmup: ClassVar[Phase]
    sampling: ClassVar[Phase]
    compressed: ClassVar[Phase]
    name: str

class Schedule:
    def __init__(self, warmup_iters: int = ..., sample_iters: int = ..., compress_iters: int = ...) -> None: ...
    def phase(self, iter: int) -> Phase: ...
    def fits_after(self, iter: int) -> bool: ...
    def window_index(self, iter: int) -> int: ...

class SampleQuantizer:
    qsgd4: ClassVar[SampleQuantizer]
    none: ClassVar[SampleQuantizer]
    name: str
    __members__: ClassVar[Dict[str, SampleQuantizer]]

class FitSamples:
    first_slice: ClassVar[FitSamples]
    all_slices: ClassVar[FitSamples]
    name: str
    __members__: ClassVar[Dict[str, FitSamples]]

class SampleSource:
    aggregated: ClassVar[SampleSource]
    local: ClassVar[SampleSource]
    name: str
    __members__: ClassVar[Dict[str, SampleSource]]

class BasisSync:
    auto: ClassVar[BasisSync]
    broadcast: ClassVar[BasisSync]
    replicated: ClassVar[BasisSync]
    name: str
    __members__: ClassVar[Dict[str, BasisSync]]

class ErrorFeedback:
    auto: ClassVar[ErrorFeedback]
    on: ClassVar[ErrorFeedback]
    off: ClassVar[ErrorFeedback]
    name: str
    __members__: ClassVar[Dict[str, ErrorFeedback]]

class SliceLayout:
    kernel_row: ClassVar[SliceLayout]
    kernel_position: ClassVar[SliceLayout]
    filter_column: ClassVar[SliceLayout]
    name: str
    __members__: ClassVar[Dict[str, SliceLayout]]

class GradiVeQOptions:
    """Every GradiVeQ option, field by field; GradiVeQOptions() holds the defaults."""
    energy: float
    max_components: int
    target_ratio: float
    min_ratio: float
    warmup_iters: int
    sample_iters: int
    compress_iters: int
    sample_quantizer: SampleQuantizer
    fit_on: FitSamples
    slice_layout: SliceLayout
    coeff_dtype: torch.dtype
    basis_dtype: torch.dtype
    uncompressed_dtype: torch.dtype
    include: List[str]
    exclude: List[str]
    min_numel: int
    linear_weights: bool
    verify_bases: bool
    seed: int
    restart_error_growth: float
    pipeline_chunks: int
    sample_source: SampleSource
    error_feedback: ErrorFeedback
    error_budget: float
    refit_threshold: float
    basis_sync: BasisSync
    fit_delay_iters: int
    def __init__(self) -> None: ...
    @staticmethod
    def paper() -> GradiVeQOptions: ...
    def validate(self) -> None: ...
    def effective_error_feedback(self) -> bool: ...
    def state_is_per_rank(self) -> bool: ...

class GatherAggregatorOptions:
    min_numel: int
    seed: int
    def __init__(self) -> None: ...

class QsgdOptions:
    levels: int
    bucket_size: int
    @property
    def norm(self) -> str: ...
    def __init__(self) -> None: ...

class Co3Options:
    gamma: float
    @property
    def format(self) -> str: ...
    def __init__(self) -> None: ...

class CasqOptions:
    bits: int
    clusters: int
    bucket_size: int
    def __init__(self) -> None: ...

class LayerStats:
    name: str
    shape: List[int]
    compressible: bool
    not_compressed_because: str
    phase: str
    slice_len: int
    num_slices: int
    tail_len: int
    num_components: int
    compression_ratio: float
    explained_variance: float
    relative_error: float
    bytes_in: int
    bytes_out: int
    window_samples: int
    skipped_samples: int
    bases_kept: int
    fits: int
    fit_status: str
    basis_checksum: int
    basis_bytes: int

class StepStats:
    iteration: int
    phase: str
    buckets: int
    collectives: int
    bytes_uncompressed: int
    bytes_payload: int
    bytes_wire: int
    aggregation_ms: float
    compress_ms: float
    decompress_ms: float
    fit_ms: float
    fit_background_ms: float
    bytes_bases: int
    sampling_aggregation: str
    relative_error: float
    window_restarts: int
    values_encoded: int
    bytes_encoded: int
    warning: str

class BucketAggregator:
    @property
    def iteration(self) -> int: ...
    def step_stats(self) -> StepStats: ...
    def run_bucket(self, bucket: torch.distributed.GradBucket) -> torch.futures.Future: ...

class GatherAggregator(BucketAggregator):
    @staticmethod
    def qsgd(process_group: torch.distributed.ProcessGroup, parameters: Sequence[Tuple[str, torch.Tensor]],
             levels: int, bucket_size: int, norm: str, min_numel: int, seed: int) -> GatherAggregator: ...
    @staticmethod
    def co3(process_group: torch.distributed.ProcessGroup, parameters: Sequence[Tuple[str, torch.Tensor]],
            format: str, gamma: float, min_numel: int) -> GatherAggregator: ...
    @staticmethod
    def casq(process_group: torch.distributed.ProcessGroup, parameters: Sequence[Tuple[str, torch.Tensor]],
             bits: int, clusters: int, bucket_size: int, min_numel: int, seed: int) -> GatherAggregator: ...
    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    def save_slot_states(self) -> List[Tuple[str, torch.Tensor]]: ...
    def load_slot_states(self, states: Sequence[Tuple[str, torch.Tensor]], iteration: int) -> None: ...

class GradiVeQAggregator(BucketAggregator):
    def __init__(self, process_group: torch.distributed.ProcessGroup,
                 parameters: Sequence[Tuple[str, torch.Tensor]], options: GradiVeQOptions) -> None: ...
    @property
    def phase(self) -> Phase: ...
    @property
    def world_size(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def window_restarts(self) -> int: ...
    @property
    def configuration_warning(self) -> str: ...
    def layer_stats(self) -> List[LayerStats]: ...
    def save_state(self) -> torch.Tensor: ...
    def load_state(self, state: torch.Tensor) -> None: ...
    def basis(self, name: str) -> PcaCompressor: ...
    def set_basis(self, name: str, pca: PcaCompressor) -> None: ...

def register_comm_hook(reducer: object, aggregator: BucketAggregator) -> None: ...
