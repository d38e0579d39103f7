"""GradiVeQState and the DDP communication hooks.

    state = gradiveq.GradiVeQState(energy=0.99, warmup_iters=2500, sample_iters=100, compress_iters=400)
    gradiveq.register_hook(ddp_model, state)           # C++ hook on ddp_model.reducer
    # or, with the same results, the Python-callable form:
    # state = gradiveq.GradiVeQState(model=ddp_model); ddp_model.register_comm_hook(state, gradiveq.hook)

All the work happens in the C++ engines (``gradiveq._C.GradiVeQAggregator``, ``gradiveq._C.GatherAggregator``);
this module validates options, binds an engine to a model's named parameters and process group, and turns stats
and checkpoints into Python objects. Every default comes from the C++ option structs (include/gradiveq/options.h):
nothing here declares one.
"""

import warnings
import weakref
from typing import Iterable, List, Optional, Sequence, Tuple, TypedDict, Union

import torch
import torch.distributed as dist

from gradiveq import _C

__all__ = ["GradiVeQState", "QsgdState", "CO3State", "CASQState", "hook", "co3_hook", "casq_hook", "register_hook",
           "StepStats", "LayerStats", "Summary", "GradiVeQStats", "GatherStats",
           "STATE_DICT_VERSION", "GATHER_STATE_DICT_VERSION", "DEFAULT_OPTIONS", "PAPER_OPTIONS", "OPTION_NAMES"]

# 3: the engine image ends with a checksum of its contents; 4: a stronger checksum; 5: error-feedback memory;
# 6: the install step of a deferred fit (fit_delay_iters); 7: the engine image records its rank (6 is still read)
STATE_DICT_VERSION = 7
_READABLE_STATE_DICT_VERSIONS = (6, 7)

# The GradiVeQ options, in the order C++ binds them (one property each on _C.GradiVeQOptions).
OPTION_NAMES = tuple(name for name, value in vars(_C.GradiVeQOptions).items() if isinstance(value, property))
_ENUM_OPTIONS = {"sample_quantizer": _C.SampleQuantizer, "fit_on": _C.FitSamples, "slice_layout": _C.SliceLayout,
                 "sample_source": _C.SampleSource, "basis_sync": _C.BasisSync, "error_feedback": _C.ErrorFeedback}
_COEFF_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_OPTIONS = ("coeff_dtype", "basis_dtype", "uncompressed_dtype")


def _options_dict(cpp_options) -> dict:
    """A C++ GradiVeQOptions as GradiVeQState keyword arguments (enums by name, dtypes as torch dtypes)."""
    out = {}
    for name in OPTION_NAMES:
        value = getattr(cpp_options, name)
        out[name] = value.name if name in _ENUM_OPTIONS else value
    return out


def _dtype(name: str, value):
    """A torch dtype, or its name ("float16", "torch.float16")."""
    if isinstance(value, str):
        dtype = getattr(torch, value.replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"GradiVeQState: argument '{name}' names no torch dtype: {value!r}")
        return dtype
    return value


def _normalised(name: str, value):
    """One GradiVeQState argument as ``state.options`` records it (dtypes by name, patterns as lists)."""
    if name in ("include", "exclude"):
        return _patterns(value, name)
    if name in _DTYPE_OPTIONS:
        return str(value).replace("torch.", "")
    if name in ("energy", "target_ratio", "min_ratio", "restart_error_growth", "error_budget", "refit_threshold"):
        return float(value)
    if name == "error_feedback" and isinstance(value, bool):  # True / False as before the "auto" default
        return "on" if value else "off"
    if name in ("verify_bases", "linear_weights"):
        return bool(value)
    return value


# The C++ defaults (GradiVeQState's signature reads them) and the paper's method (GradiVeQState.paper()).
DEFAULT_OPTIONS = _options_dict(_C.GradiVeQOptions())
PAPER_OPTIONS = _options_dict(_C.GradiVeQOptions.paper())
_D = DEFAULT_OPTIONS
_QSGD, _CO3, _CASQ, _GATHER = _C.QsgdOptions(), _C.Co3Options(), _C.CasqOptions(), _C.GatherAggregatorOptions()


def _patterns(value, name) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        out = list(value)
        if all(isinstance(v, str) for v in out):
            return out
    raise ValueError(f"GradiVeQState: argument '{name}' must be None, a glob pattern or a list of them, got {value!r}")


def _step_dict(st) -> "StepStats":
    return dict(iteration=st.iteration, phase=st.phase, buckets=st.buckets, collectives=st.collectives,
                bytes_uncompressed=st.bytes_uncompressed, bytes_payload=st.bytes_payload, bytes_wire=st.bytes_wire,
                aggregation_ms=st.aggregation_ms, compress_ms=st.compress_ms, decompress_ms=st.decompress_ms,
                fit_ms=st.fit_ms, fit_background_ms=st.fit_background_ms, bytes_bases=st.bytes_bases, sampling_aggregation=st.sampling_aggregation,
                relative_error=st.relative_error, window_restarts=st.window_restarts,
                values_encoded=st.values_encoded, bytes_encoded=st.bytes_encoded, warning=st.warning)


def _module_of(model) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _trainable(model) -> list:
    return [(n, p) for n, p in _module_of(model).named_parameters() if p.requires_grad]


def _group_of(model, process_group):
    if process_group is not None:
        return process_group
    return getattr(model, "process_group", None) or dist.distributed_c10d._get_default_group()


# --- typed stats() results -------------------------------------------------------------------------------------

class StepStats(TypedDict):
    """The last completed step (all buckets of one iteration), as every state's ``stats()["step"]``."""
    iteration: int
    phase: str
    buckets: int
    collectives: int
    bytes_uncompressed: int  # float32 bytes of all gradients aggregated
    bytes_payload: int       # bytes this rank contributed to collectives
    bytes_wire: int          # ring estimate: 2(N-1)/N per all-reduce byte, N-1 per all-gather byte
    aggregation_ms: float
    compress_ms: float
    decompress_ms: float
    fit_ms: float            # fitting and distributing bases, as the step waited for them
    fit_background_ms: float  # fit_delay_iters: the worker's time for the bases installed in this step
    bytes_bases: int         # basis images this rank broadcast as a fitting rank (steps that fit; not in payload)
    sampling_aggregation: str
    relative_error: float    # eq. 7 local loss of the compressed layers, or the codec's error; -1: none
    window_restarts: int
    values_encoded: int
    bytes_encoded: int
    warning: str             # what the configuration leaves undone ("" when nothing)


class LayerStats(TypedDict):
    """One parameter in ``GradiVeQState.stats()["layers"]``."""
    shape: Tuple[int, ...]
    compressible: bool
    not_compressed_because: str
    phase: str
    K: int
    slices: int
    tail: int
    d: int
    ratio: float             # K / d
    wire_ratio: float        # bytes_in / bytes_out of the last step
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


class Summary(TypedDict, total=False):
    compressible_layers: int
    fitted_layers: int
    conv_bytes_in: int
    conv_bytes_out: int
    conv_ratio: float        # conv_bytes_in / conv_bytes_out (present once a conv layer has been sent)
    basis_bytes: int
    first_compressed_iteration: int


class GradiVeQStats(TypedDict):
    iteration: int
    phase: str
    world_size: int
    rank: int
    options: dict
    step: StepStats
    summary: Summary
    layers: dict             # parameter name -> LayerStats


class GatherStats(TypedDict):
    iteration: int
    world_size: int
    rank: int
    options: dict
    bits_per_element: float
    relative_error: float
    bytes_payload: int
    bytes_wire: int
    step: StepStats


class _HookState:
    """What every hook state shares: a C++ engine bound to one model, reachable by ``hook``/``register_hook``."""

    _engine = None
    _module = None  # weak reference to the module the engine is bound to

    def attach(self, model: torch.nn.Module):
        """Binds the state to a DDP model (or its module): its named parameters and process group."""
        self._check_unattached()
        params = _trainable(model)
        self._engine = self._make_engine(_group_of(model, self.process_group), params)
        self._param_names = [n for n, _ in params]
        self._module = weakref.ref(_module_of(model))
        warning = getattr(self._engine, "configuration_warning", "")
        if warning:  # once per state: the engine repeats it in every step's stats
            warnings.warn(f"gradiveq.{type(self).__name__}: {warning}", UserWarning, stacklevel=3)
        return self

    def _make_engine(self, group, params):
        raise NotImplementedError

    def _bind_if_given(self, model) -> None:
        """The end of every state's __init__: unbound, or bound to ``model`` when one is given."""
        self._engine = None
        self._param_names = None
        if model is not None:
            self.attach(model)

    def _check_bound_to(self, ddp_model):
        """Raises unless the state is bound to ``ddp_model``'s module (one state serves one model)."""
        if self._module is not None and self._module() is not _module_of(ddp_model):
            raise ValueError(f"gradiveq.register_hook: argument 'state' is a {type(self).__name__} already "
                             f"attached to another model; create one state per model")

    def _check_envelope(self, state_dict, fmt: str, versions: Tuple[int, ...], per_rank: bool) -> None:
        """What every state dict must match before its contents are read: format, version, world size, (for
        per-rank states) rank, the model's parameters and the options. Raises ValueError naming the mismatch."""
        engine = self._require_engine()
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict) or state_dict.get("format") != fmt:
            raise ValueError(f"{where}: argument 'state_dict' is not a {type(self).__name__} state dict "
                             f"(format tag {state_dict.get('format') if isinstance(state_dict, dict) else None!r})")
        if state_dict.get("version") not in versions:
            raise ValueError(f"{where}: argument 'state_dict' has version {state_dict.get('version')!r}, this "
                             f"build reads version {' or '.join(map(str, versions))}")
        if state_dict.get("world_size") != engine.world_size:
            raise ValueError(f"{where}: argument 'state_dict' was saved with world size "
                             f"{state_dict.get('world_size')} but this process group has {engine.world_size} ranks")
        if per_rank and state_dict.get("rank") != engine.rank:
            raise ValueError(f"{where}: argument 'state_dict' was saved on rank {state_dict.get('rank')}, this is "
                             f"rank {engine.rank}: each rank loads its own (the state is per rank)")
        if state_dict.get("parameters") != self._param_names:
            raise ValueError(f"{where}: argument 'state_dict' names other parameters than this model "
                             f"(a different model?)")
        self._check_options(where, state_dict.get("options"))

    def _check_options(self, where: str, saved) -> None:
        """A state dict saved with other options would pair this run's options with another run's state."""
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: argument 'state_dict' lacks its 'options' dict")
        if isinstance(saved.get("error_feedback"), bool):  # version 6 recorded True / False
            saved = dict(saved, error_feedback=_normalised("error_feedback", saved["error_feedback"]))
        differ = sorted(k for k in set(saved) | set(self.options) if saved.get(k) != self.options.get(k))
        if differ:
            detail = ", ".join(f"{k}: saved {saved.get(k)!r}, here {self.options.get(k)!r}" for k in differ)
            raise ValueError(f"{where}: argument 'state_dict' was saved with other options ({detail}); create the "
                             f"state with the saved options (state_dict['options']) to resume")

    def _require_engine(self):
        if self._engine is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a model: use gradiveq.register_hook("
                               f"ddp_model, state), or {type(self).__name__}(model=ddp_model) before "
                               f"ddp_model.register_comm_hook")
        return self._engine

    def _check_unattached(self):
        if self._engine is not None:
            raise RuntimeError(f"{type(self).__name__} is already attached to a model; create one state per model")

    def __getstate__(self):
        raise TypeError(f"{type(self).__name__} holds a process group and C++ state: use state_dict() to "
                        f"checkpoint it")


GATHER_STATE_DICT_VERSION = 1
_CO3_FORMATS = ("fp4", "fp8")


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}: argument '{name}' must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: argument '{name}' must be >= {minimum}, got {value}")


class _GatherState(_HookState):
    """What CO3State and CASQState share: a C++ GatherAggregator (all-gather, decode, sum, average) bound to one
    model's named parameters, its statistics and its checkpoint."""

    _FORMAT = ""

    def _make_engine(self, group, params):
        raise NotImplementedError

    @property
    def iteration(self) -> int:
        return self._require_engine().iteration

    def stats(self) -> "GatherStats":
        """The last completed step: ``bits_per_element`` (bits of the codec messages this rank sent per value it
        encoded; the length table and padding are in ``bytes_payload``, not here), ``relative_error``
        (||decode(encode(v)) - v|| / ||v|| over the values v this rank encoded, CO3's v including the error
        memory; -1 before any), ``bytes_payload`` (what this rank put into collectives) and ``bytes_wire`` (ring
        estimate: (N-1) x each all-gather's padded payload + 2(N-1)/N x the all-reduce), plus ``step``, the
        engine's full step record."""
        engine = self._require_engine()
        step = _step_dict(engine.step_stats())
        bits = 8.0 * step["bytes_encoded"] / step["values_encoded"] if step["values_encoded"] else float("nan")
        return dict(iteration=engine.iteration, world_size=engine.world_size, rank=engine.rank,
                    options=dict(self.options), bits_per_element=bits, relative_error=step["relative_error"],
                    bytes_payload=step["bytes_payload"], bytes_wire=step["bytes_wire"], step=step)

    def state_dict(self) -> dict:
        engine = self._require_engine()
        return {"format": self._FORMAT, "version": GATHER_STATE_DICT_VERSION, "options": dict(self.options),
                "world_size": engine.world_size, "rank": engine.rank, "iteration": engine.iteration,
                "parameters": list(self._param_names),
                "slot_states": {name: t for name, t in engine.save_slot_states()}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores ``state_dict()``. Raises ValueError, leaving the running state untouched, on another format,
        version, world size, rank (the state is per rank) or model."""
        engine = self._require_engine()
        where = f"{type(self).__name__}.load_state_dict"
        self._check_envelope(state_dict, self._FORMAT, (GATHER_STATE_DICT_VERSION,), per_rank=True)
        slots = state_dict.get("slot_states")
        if not isinstance(slots, dict):
            raise ValueError(f"{where}: argument 'state_dict' lacks its 'slot_states' dict")
        iteration = state_dict.get("iteration")
        if isinstance(iteration, bool) or not isinstance(iteration, int):
            raise ValueError(f"{where}: argument 'state_dict' holds iteration {iteration!r}, not an int")
        engine.load_slot_states(list(slots.items()), iteration)  # C++ validates names and sizes first


class QsgdState(_GatherState):
    """QSGD baseline (Alistarh et al. 2017) as a DDP hook state: the GradiVeQ paper's comparison.

    Each parameter with at least ``min_numel`` values is quantised to ``levels`` magnitude levels plus a sign per
    value, with one float32 scale per ``bucket_size`` values (``norm``: "max" as in QSGD's experiments, or "l2"),
    by seeded stochastic rounding (unbiased). QSGD codes cannot be summed, so they are all-gathered and every rank
    decodes and averages them; smaller parameters go uncompressed in one all-reduce. The default, 7 levels, is
    "4-bit QSGD": 1 sign bit + 3 level bits, about 7.9x fewer bytes than float32 with bucket 512. Stateless:
    ``state_dict()`` holds the options and the iteration (which seeds the rounding).

    Args:
        process_group: the group to aggregate over; None uses the DDP model's (the default group).
        levels: magnitude levels s >= 1 (7: 4-bit QSGD).
        bucket_size: values per float32 scale.
        norm: "max" or "l2" scaling of each bucket.
        min_numel: parameters with fewer values travel uncompressed.
        seed: seeds the stochastic rounding (mixed with iteration, rank and position).
        model: optional DDP model (or module) to bind now; ``register_hook`` binds it otherwise.
    """

    _FORMAT = "gradiveq.QsgdState"

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, levels: int = _QSGD.levels,
                 bucket_size: int = _QSGD.bucket_size, norm: str = _QSGD.norm, min_numel: int = _GATHER.min_numel,
                 seed: int = _GATHER.seed, model: Optional[torch.nn.Module] = None):
        for name, value in (("levels", levels), ("bucket_size", bucket_size), ("min_numel", min_numel),
                            ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"QsgdState: argument '{name}' must be an int, got {value!r}")
        if seed < 0:
            raise ValueError(f"QsgdState: argument 'seed' must be >= 0, got {seed}")
        self.process_group = process_group
        self.options = dict(levels=levels, bucket_size=bucket_size, norm=norm, min_numel=min_numel, seed=seed)
        _C.QsgdCodec(levels=levels, bucket_size=bucket_size, norm=norm)  # validates, raises ValueError
        if min_numel < 0:
            raise ValueError(f"QsgdState: argument 'min_numel' must be >= 0, got {min_numel}")
        self._bind_if_given(model)

    def _make_engine(self, group, params):
        return _C.GatherAggregator.qsgd(group, params, **self.options)

    @property
    def bits_per_value(self) -> int:
        return _C.QsgdCodec(self.options["levels"], self.options["bucket_size"], self.options["norm"]).bits_per_value


class CO3State(_GatherState):
    """CO3 (Chen et al. 2022, "convert, compress, correct") as a DDP hook state.

    Each parameter with at least ``min_numel`` values is error-corrected (v = g + gamma e), scaled and rounded to
    the ``format`` grid ("fp4": 11 values, scale from a generalized-normal fit; "fp8": 247 values, power-of-two
    scale), and its grid indices are Huffman-coded with the table sent along. Each rank keeps its own error
    memory e <- v - Q(v) per parameter (``state_dict()`` holds it: save one per rank). The messages cannot be
    summed, so every rank all-gathers them (sizes first: they vary), decodes, sums and averages; smaller
    parameters travel uncompressed in one all-reduce. See docs/algorithms.md, "CO3".

        state = gradiveq.CO3State(format="fp4", gamma=0.9)
        gradiveq.register_hook(ddp_model, state)   # or CO3State(model=ddp_model) + ddp_model.register_comm_hook(
                                                   #    state, gradiveq.co3_hook)

    Args:
        process_group: the group to aggregate over; None uses the DDP model's (the default group).
        format: "fp4" (11-value grid, generalized-normal scale) or "fp8" (247 values, power-of-two scale).
        gamma: error-correction decay in [0, 1]: v = g + gamma e.
        min_numel: parameters with fewer values travel uncompressed.
        model: optional DDP model (or module) to bind now; ``register_hook`` binds it otherwise.
    """

    _FORMAT = "gradiveq.CO3State"

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, format: str = _CO3.format,
                 gamma: float = _CO3.gamma, min_numel: int = _GATHER.min_numel,
                 model: Optional[torch.nn.Module] = None):
        if format not in _CO3_FORMATS:
            raise ValueError(f"CO3State: argument 'format' must be one of {list(_CO3_FORMATS)}, got {format!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= float(gamma) <= 1.0:
            raise ValueError(f"CO3State: argument 'gamma' must be a number in [0, 1], got {gamma!r}")
        _check_int("CO3State", "min_numel", min_numel, 0)
        self.process_group = process_group
        self.options = dict(format=format, gamma=float(gamma), min_numel=min_numel)
        self._bind_if_given(model)

    def _make_engine(self, group, params):
        return _C.GatherAggregator.co3(group, params, **self.options)


class CASQState(_GatherState):
    """CASQ (Ge et al. 2021/2023, cluster-aware quantization) as a DDP hook state, in the reading of
    docs/algorithms.md, "CASQ" (the paper's full text was not available).

    Each parameter with at least ``min_numel`` values is cut into buckets of ``bucket_size`` values; each bucket
    is clustered (1-D k-means, ``clusters``), its 2^``bits`` levels are shared among the clusters by Neyman
    allocation, and every value rounds stochastically (unbiased, seeded) to one of its two neighbouring levels.
    A message is the float32 codebooks plus ``bits`` bits per value: bits + 32 * 2^bits / bucket_size bits per
    value (2.25 at 2 bits, 3.5 at 3 bits for buckets of 512). Stateless: ``state_dict()`` holds only options and
    the iteration (which seeds the rounding).

    Args:
        process_group: the group to aggregate over; None uses the DDP model's (the default group).
        bits: 2 or 3 bits per value (2^bits levels per bucket).
        clusters: k-means clusters per bucket, 1 to 2^bits.
        bucket_size: values per codebook.
        min_numel: parameters with fewer values travel uncompressed.
        seed: seeds the stochastic rounding.
        model: optional DDP model (or module) to bind now; ``register_hook`` binds it otherwise.
    """

    _FORMAT = "gradiveq.CASQState"

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, bits: int = _CASQ.bits,
                 clusters: int = _CASQ.clusters, bucket_size: int = _CASQ.bucket_size,
                 min_numel: int = _GATHER.min_numel, seed: int = _GATHER.seed,
                 model: Optional[torch.nn.Module] = None):
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (2, 3):
            raise ValueError(f"CASQState: argument 'bits' must be 2 or 3, got {bits!r}")
        _check_int("CASQState", "clusters", clusters, 1)
        if clusters > 2 ** bits:
            raise ValueError(f"CASQState: argument 'clusters' must be <= 2^bits = {2 ** bits} (every cluster needs a "
                             f"level), got {clusters}")
        _check_int("CASQState", "bucket_size", bucket_size, 1)
        _check_int("CASQState", "min_numel", min_numel, 0)
        _check_int("CASQState", "seed", seed, 0)
        self.process_group = process_group
        self.options = dict(bits=bits, clusters=clusters, bucket_size=bucket_size, min_numel=min_numel, seed=seed)
        self._bind_if_given(model)

    @property
    def bits_per_element(self) -> float:
        """Bits per value of a full bucket's message (the codebook amortised over bucket_size values)."""
        o = self.options
        return o["bits"] + 32.0 * 2 ** o["bits"] / o["bucket_size"]

    def _make_engine(self, group, params):
        return _C.GatherAggregator.casq(group, params, **self.options)


class GradiVeQState(_HookState):
    """Options and state of GradiVeQ gradient aggregation for one DDP model.

    The defaults were chosen by measurement on real data (docs/results.md, "Accuracy on real data"): every slice of every
    sampled gradient is a PCA sample, one kernel position per slice, energy 0.995 with d capped at K/4, every rank
    fits every basis itself (no broadcasts), the compressed window is twice the sampling window, the sampling
    windows travel as the paper's 4-bit QSGD, and coefficients and whatever travels uncompressed go in float16.
    ``GradiVeQState.paper()`` gives the paper's method exactly.

    Args:
        process_group: the group to aggregate over; None uses the DDP model's (the default group).
        energy: PCA energy threshold in (0, 1] (default 0.995; paper: lambda = 0.01, i.e. 0.99): keep the smallest
            d whose eigenvalues hold this fraction of the window's variance. 1.0 keeps all K components (d = K):
            the hook is then an exact all-reduce up to float rounding (set min_ratio=0, max_components=0,
            sample_quantizer="none", coeff_dtype=torch.float32 and uncompressed_dtype=torch.float32 too).
        max_components: cap on d (default 0: none). With basis_sync="broadcast" a basis is K x d and is broadcast
            after every window, so on wide layers (ResNet-32's K = 4096) a cap of 192 saves more broadcast bytes
            than the extra directions return (docs/results.md 7e); replicated fits pay only the coefficients.
        warmup_iters, sample_iters, compress_iters: the schedule (default 2500 / 100 / 100; paper: 2500 / 100 /
            400). Iterations count synchronised steps (``no_sync`` steps are not counted).
        sample_quantizer: how sampling iterations are aggregated: "qsgd4" (the default and the paper's: 4-bit
            QSGD, 7 levels, bucket 512, via all-gather because QSGD codes cannot be summed) or "none"
            (uncompressed all-reduce in ``uncompressed_dtype``: exact samples; an all-gather's bytes per rank grow
            with the world size, so from about 8 ranks on "none" puts fewer bytes on the wire).
        coeff_dtype: the dtype the coefficients travel in: torch.float16 (default; half the bytes of float32, with
            the same test accuracy on Fashion-MNIST, benchmarks/results/accuracy_fashion_mnist_cnn.md),
            torch.bfloat16, or torch.float32 (the paper's). A float16 coefficient beyond 65504 (loss scale too
            high) turns inf on every rank alike; GradScaler skips that step, as with torch's fp16 hook.
        basis_dtype: torch.float32, or torch.bfloat16 / torch.float16 to store the PCA bases in half precision:
            half the basis memory and half the bytes the codec streams per step (products still accumulate in
            float32). bfloat16 on ResNet-32 (3 seeds): accuracy as float32's within seed noise, the codec about
            0.8x on one CPU thread (docs/results.md 7n); a lossless fit (energy 1) stays lossless only in
            float32.
        uncompressed_dtype: the dtype of everything sent uncompressed (the warm-up, uncompressed sampling
            windows, layers that are not compressed): torch.float16 (the default) or torch.bfloat16, half the
            bytes of float32, as torch's fp16 / bf16 hooks (on Fashion-MNIST without loss of accuracy), or
            torch.float32 (exact warm-up). A half-precision model always sends its own dtype. Equal to
            coeff_dtype, the coefficients and the verification code ride in the same all-reduce.
        pipeline_chunks: compressed steps cut a bucket's compressed layers into up to this many groups of about
            equal size, each with its own all-reduce, so compressing one group overlaps the transfer of the
            previous one and decompressing it the transfer of the next (docs/results.md, "Hiding the aggregation").
        include, exclude: glob patterns on parameter names; by default every conv weight (4-D parameter) with at
            least ``min_numel`` values is compressed.
        min_numel: smallest layer worth compressing.
        fit_on: "all_slices" (default) or "first_slice" (paper) of each sampled gradient as PCA samples.
        slice_layout: "kernel_position" (K = D*F), "kernel_row" (paper, K = W*D*F) or "filter_column" (K = F:
            one slice per input channel and kernel position, across all filters; a Linear weight's slices are its
            input columns, K = out). Filter columns make the basis F x d, cheap to refit every few steps.
        target_ratio: if > 0, choose d for this compression ratio, d = ceil(K / target_ratio), instead of by
            energy (d never exceeds the rank of the window's samples).
        min_ratio: if > 0 (default 4), cap d at floor(K / min_ratio) after the energy rule: every layer
            compresses at least this much.
        restart_error_growth: the paper's adaptive window (eq. 7); 0 disables it. Each rank measures its local
            loss E (sqrt of the summed squared residuals over the summed squared gradients of the layers it
            compressed in the step); when E exceeds restart_error_growth (> 1) times the mean E of the window's first
            3 compressed steps on any rank, all ranks leave the compressed window and sample again from the next
            step (they agree through one float in the step's last all-reduce). ``stats()["step"]`` reports E
            ("relative_error") and the restarts so far.
        sample_source: "aggregated" (the window's aggregated gradients are the samples, so the window travels
            uncompressed or QSGD-coded) or "local" (the rank that fits a layer uses its own error-corrected local
            gradients, times N; once a layer has a basis its windows are compressed steps, only new bases travel,
            and the first window is the warm-up's last sample_iters steps, so nothing goes uncompressed after it).
        error_feedback: "auto" (the default), "on" (or True) or "off" (or False, the paper's). Keep what
            compression lost on each rank, e = x - U U^T x, and add it to the next step's gradient (x = g + e);
            with local samples the next basis is fitted on the error-corrected gradients. "auto" turns it on
            wherever something can be lost (compress_iters > 0, energy < 1 or a cap on d, and refit_threshold < 1,
            a basis that moves) unless restart_error_growth is set (the adaptive window would count the memory as
            drift); "on" raises where it would do nothing. On ResNet-32 it is worth +0.41 points, on
            the small CNN +0.13 (Fashion-MNIST, 3 seeds, docs/results.md 7k). The memory is per rank: each rank
            saves and loads its own state_dict().
        error_budget: if > 0 (in (0, 1)), each layer's d is the smallest with a held-out relative error (every
            4th sample of the window, fitted on the others) within this budget, capped by min_ratio /
            max_components; energy and target_ratio are then ignored.
        refit_threshold: a refitted basis replaces the current one only if its subspace moved by more than this
            (1 - ||U_old^T U_new||^2 / d, in [0, 1]); a kept basis costs no broadcast. 1 keeps the first basis.
        basis_sync: "auto" (the default: "replicated" with aggregated samples and verify_bases on, else
            "broadcast"), "broadcast" (layer j is fitted by rank j % N, which broadcasts its basis) or "replicated"
            (every rank fits every layer from the window's aggregated samples, identical on all ranks, with a
            deterministic fit: bit-identical bases and no basis bytes on the wire, for N times the fitting time
            per rank). Replicated needs sample_source="aggregated" and verify_bases, which raises on every rank
            should one rank's fit ever differ (ranks of different builds or CPU kinds).
        fit_delay_iters: if > 0, a window's fits run on a worker thread of idle priority (in the time the rank
            waits for its collectives) while this many compressed steps go on with the current bases (a layer
            without one goes uncompressed), and every rank installs the new bases at the start of the same step,
            so ranks stay bit-identical; a step waits only for what the worker has not finished by then. 0 (the
            default): the window's first compressed step fits them all before it aggregates. Must be smaller
            than compress_iters.
        linear_weights: also compress 2-D weights (nn.Linear), one output row per slice (K = in_features).
        verify_bases: carry a checksum of the iteration counter and all bases in the first bucket's all-reduce
            of every step, and raise on every rank when any rank differs.
        seed: seeds QSGD's stochastic rounding.
        model: optional DDP model (or module) to bind now; ``register_hook`` binds it otherwise.
    """

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, energy: float = _D["energy"],
                 warmup_iters: int = _D["warmup_iters"], sample_iters: int = _D["sample_iters"],
                 compress_iters: int = _D["compress_iters"], sample_quantizer: str = _D["sample_quantizer"],
                 coeff_dtype: torch.dtype = _D["coeff_dtype"], include: Union[None, str, Sequence[str]] = None,
                 exclude: Union[None, str, Sequence[str]] = None, min_numel: int = _D["min_numel"],
                 error_feedback: Union[str, bool] = _D["error_feedback"], verify_bases: bool = _D["verify_bases"],
                 seed: int = _D["seed"],
                 max_components: int = _D["max_components"], fit_on: str = _D["fit_on"],
                 slice_layout: str = _D["slice_layout"], target_ratio: float = _D["target_ratio"],
                 min_ratio: float = _D["min_ratio"], restart_error_growth: float = _D["restart_error_growth"],
                 basis_dtype: torch.dtype = _D["basis_dtype"],
                 uncompressed_dtype: torch.dtype = _D["uncompressed_dtype"],
                 pipeline_chunks: int = _D["pipeline_chunks"],
                 sample_source: str = _D["sample_source"], error_budget: float = _D["error_budget"],
                 refit_threshold: float = _D["refit_threshold"], linear_weights: bool = _D["linear_weights"],
                 basis_sync: str = _D["basis_sync"], fit_delay_iters: int = _D["fit_delay_iters"], model: Optional[torch.nn.Module] = None):
        if isinstance(error_feedback, bool):
            error_feedback = _normalised("error_feedback", error_feedback)
        for name, value in (("sample_quantizer", sample_quantizer), ("fit_on", fit_on),
                            ("slice_layout", slice_layout), ("sample_source", sample_source),
                            ("basis_sync", basis_sync), ("error_feedback", error_feedback)):
            members = sorted(_ENUM_OPTIONS[name].__members__)
            if value not in members:
                also = ", True or False" if name == "error_feedback" else ""
                raise ValueError(f"GradiVeQState: argument '{name}' must be one of {members}{also}, got {value!r}")
        # The dtypes also as their names ("float16"), as state.options records them: GradiVeQState(**state.options)
        # rebuilds the same state.
        coeff_dtype, basis_dtype = _dtype("coeff_dtype", coeff_dtype), _dtype("basis_dtype", basis_dtype)
        uncompressed_dtype = _dtype("uncompressed_dtype", uncompressed_dtype)
        for name, value in (("verify_bases", verify_bases), ("linear_weights", linear_weights)):
            if not isinstance(value, bool):
                raise ValueError(f"GradiVeQState: argument '{name}' must be True or False, got {value!r}")
        for name, value in (("coeff_dtype", coeff_dtype), ("basis_dtype", basis_dtype),
                            ("uncompressed_dtype", uncompressed_dtype)):
            if value not in _COEFF_DTYPES:
                raise ValueError(f"GradiVeQState: argument '{name}' must be one of {_COEFF_DTYPES}, got {value!r}")
        for name, value in (("warmup_iters", warmup_iters), ("sample_iters", sample_iters),
                            ("compress_iters", compress_iters), ("min_numel", min_numel),
                            ("max_components", max_components), ("seed", seed),
                            ("pipeline_chunks", pipeline_chunks), ("fit_delay_iters", fit_delay_iters)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"GradiVeQState: argument '{name}' must be an int, got {value!r}")
        if seed < 0:
            raise ValueError(f"GradiVeQState: argument 'seed' must be >= 0, got {seed}")
        for name, value in (("energy", energy), ("target_ratio", target_ratio), ("min_ratio", min_ratio),
                            ("restart_error_growth", restart_error_growth), ("error_budget", error_budget),
                            ("refit_threshold", refit_threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"GradiVeQState: argument '{name}' must be a number, got {value!r}")
        self.process_group = process_group
        given = locals()
        self.options = {name: _normalised(name, given[name]) for name in OPTION_NAMES}
        # The C++ options validate the rest (energy range, schedule) and raise ValueError naming the argument.
        self._cpp_options = _C.GradiVeQOptions()
        for name in OPTION_NAMES:
            value = self.options[name]
            if name in _ENUM_OPTIONS:
                value = _ENUM_OPTIONS[name].__members__[value]
            elif name in _DTYPE_OPTIONS:
                value = getattr(torch, value)
            setattr(self._cpp_options, name, value)
        self._cpp_options.validate()
        self._bind_if_given(model)

    @classmethod
    def paper(cls, **overrides) -> "GradiVeQState":
        """The paper's method exactly (Yu et al. 2018): basis fitted on the first slice of each of the window's
        aggregated gradients, K = one kernel row (W*D*F), energy 0.99, 4-bit QSGD sampling, schedule 2500 / 100 /
        400, float32 coefficients. Keyword arguments override single options (e.g. the schedule for a short run)."""
        options = dict(PAPER_OPTIONS)
        options.update(overrides)
        return cls(**options)

    # -- binding -------------------------------------------------------------------------------------------
    def _make_engine(self, group, params):
        return _C.GradiVeQAggregator(group, params, self._cpp_options)

    # -- introspection -------------------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        return self._require_engine().iteration

    @property
    def phase(self) -> str:
        return self._require_engine().phase.name

    def stats(self) -> "GradiVeQStats":
        """Per-layer and last-step statistics.

        ``layers`` maps each parameter name to: phase, K, d, ``ratio`` (K / d, the PCA ratio), ``wire_ratio``
        (float32 bytes in / bytes the layer put into collectives, the measure ``summary["conv_ratio"]`` sums),
        explained variance, relative error (this rank's local loss of eq. 7 in the last compressed step), bytes
        in/out, samples, fits, basis bytes, and ``not_compressed_because`` ("" for a compressed layer).
        ``step`` holds the last completed step: iteration, phase, bytes (uncompressed, payload, ring wire
        estimate), aggregation / compress / decompress / fit times in ms, how sampling was aggregated, and
        ``warning`` (what the configuration leaves undone). ``summary["error_feedback"]`` says whether error
        feedback is on (what "auto" resolved to). ``summary["first_compressed_iteration"]`` says when
        compression starts under the schedule (2,600 with the defaults: a short trial compresses nothing).
        """
        engine = self._require_engine()
        layers = {}
        for s in engine.layer_stats():
            layers[s.name] = dict(
                shape=tuple(s.shape), compressible=s.compressible, phase=s.phase, K=s.slice_len,
                slices=s.num_slices, tail=s.tail_len, d=s.num_components, ratio=s.compression_ratio,
                explained_variance=s.explained_variance, relative_error=s.relative_error, bytes_in=s.bytes_in,
                bytes_out=s.bytes_out, window_samples=s.window_samples, skipped_samples=s.skipped_samples,
                bases_kept=s.bases_kept,
                fits=s.fits, fit_status=s.fit_status, basis_checksum=s.basis_checksum,
                basis_bytes=s.basis_bytes, not_compressed_because=s.not_compressed_because,
                wire_ratio=s.bytes_in / s.bytes_out if s.bytes_out else 0.0)
        step = _step_dict(engine.step_stats())
        conv = [v for v in layers.values() if v["compressible"]]
        compressed = [v for v in conv if v["d"] > 0]
        summary = dict(
            compressible_layers=len(conv), fitted_layers=len(compressed),
            conv_bytes_in=sum(v["bytes_in"] for v in conv), conv_bytes_out=sum(v["bytes_out"] for v in conv),
            basis_bytes=sum(v["basis_bytes"] for v in conv),
            error_feedback=self._cpp_options.effective_error_feedback(),
            first_compressed_iteration=(max(self.options["warmup_iters"], self.options["sample_iters"])
                                        if self.options["sample_source"] == "local"
                                        else self.options["warmup_iters"] + self.options["sample_iters"]))
        if summary["conv_bytes_out"]:
            summary["conv_ratio"] = summary["conv_bytes_in"] / summary["conv_bytes_out"]
        return dict(iteration=engine.iteration, phase=engine.phase.name, world_size=engine.world_size,
                    rank=engine.rank, options=dict(self.options), step=step, summary=summary, layers=layers)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Options, iteration, bases, the current sampling window and the error-feedback memory. With error
        feedback on (the default wherever compression loses something) or local samples it is per rank: each rank
        saves and loads its own (loading another rank's raises). Otherwise it is identical on all ranks."""
        engine = self._require_engine()
        return {"format": "gradiveq.GradiVeQState", "version": STATE_DICT_VERSION, "options": dict(self.options),
                "world_size": engine.world_size, "rank": engine.rank, "iteration": engine.iteration,
                "parameters": list(self._param_names), "engine_state": engine.save_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores ``state_dict()``. Raises ValueError, leaving the running state untouched, on another
        version, world size or model, or on a truncated or corrupted state."""
        engine = self._require_engine()
        self._check_envelope(state_dict, "gradiveq.GradiVeQState", _READABLE_STATE_DICT_VERSIONS,
                             per_rank=self._cpp_options.state_is_per_rank())
        engine.load_state(state_dict["engine_state"])


def hook(state: _HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The Python-callable form of the GradiVeQ hook (same C++ engine as ``register_hook``).

    Example::
        >>> state = gradiveq.GradiVeQState(model=ddp_model)
        >>> ddp_model.register_comm_hook(state, gradiveq.hook)
    """
    fut = state._require_engine().run_bucket(bucket)
    # DDP's Python hook path requires the future's value to be a Python object (python_comm_hook.cpp asserts
    # result.isPyObject()); a one-line Python callback converts the C++ tensor result.
    return fut.then(lambda f: f.value())


def co3_hook(state: CO3State, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The Python-callable CO3 hook (same C++ engine as ``register_hook``).

    Example::
        >>> state = gradiveq.CO3State(model=ddp_model)
        >>> ddp_model.register_comm_hook(state, gradiveq.co3_hook)
    """
    if not isinstance(state, CO3State):
        raise ValueError(f"gradiveq.co3_hook: argument 'state' must be a CO3State, got {type(state).__name__}")
    return hook(state, bucket)


def casq_hook(state: CASQState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The Python-callable CASQ hook (same C++ engine as ``register_hook``).

    Example::
        >>> state = gradiveq.CASQState(model=ddp_model)
        >>> ddp_model.register_comm_hook(state, gradiveq.casq_hook)
    """
    if not isinstance(state, CASQState):
        raise ValueError(f"gradiveq.casq_hook: argument 'state' must be a CASQState, got {type(state).__name__}")
    return hook(state, bucket)


def register_hook(ddp_model: torch.nn.parallel.DistributedDataParallel, state: _HookState) -> None:
    """Registers the C++ hook of ``state`` (GradiVeQState, QsgdState, CO3State or CASQState) on
    ``ddp_model.reducer``: no Python runs per bucket.

    Call it once, before the first backward. Example::
        >>> ddp_model = torch.nn.parallel.DistributedDataParallel(model)
        >>> state = gradiveq.GradiVeQState()
        >>> gradiveq.register_hook(ddp_model, state)
    """
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise ValueError(f"gradiveq.register_hook: argument 'ddp_model' must be a DistributedDataParallel "
                         f"model, got {type(ddp_model).__name__}")
    if not isinstance(state, _HookState):
        raise ValueError(f"gradiveq.register_hook: argument 'state' must be a GradiVeQState, QsgdState, CO3State or "
                         f"CASQState, got {type(state).__name__}")
    if state._engine is None:
        state.attach(ddp_model)
    state._check_bound_to(ddp_model)
    _C.register_comm_hook(ddp_model.reducer, state._engine)
    try:  # DDP's own bookkeeping, as DistributedDataParallel.register_comm_hook does it
        ddp_model.logger._set_comm_hook_name(f"gradiveq.{type(state).__name__}")
    except Exception:  # noqa: BLE001  (logging only)
        pass
