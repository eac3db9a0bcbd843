"""The statistics of one owner and their file format.

A statistics file is safetensors: one packed upper-triangle float64 Gram per shared input (``gram.<key>``), the
optional diagonal Fisher per parameter (``fisher.<parameter>``), and one JSON metadata entry ``gramfuse`` holding the
format version, the fingerprint of the weights the statistics were computed from, which modules share which Gram,
token and example counts, and the settings used. By default it lives in the model folder as
``gramfuse-stats.safetensors`` so that a published checkpoint can carry its statistics.
"""

from __future__ import annotations

import hashlib
import math
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import StatisticsError
from .finite import all_finite
from .privacy import TAIL_SIGMAS

FORMAT_VERSION = 1
STATS_FILENAME = "gramfuse-stats.safetensors"
METADATA_KEY = "gramfuse"
GRAM_PREFIX = "gram."
FISHER_PREFIX = "fisher."


ROW_BLOCK = 256


def _row_blocks(height: int, span: int, device: torch.device):
    """``(start, stop, packed_start, packed_stop, rows, cols)`` per block of rows of a band (``height`` rows of a
    symmetric matrix from its diagonal on, ``span`` columns wide; a whole ``d x d`` matrix is one band): the block's
    upper part, within columns ``start:``, is the upper triangle of a (stop - start) x (span - start) matrix, stored
    contiguously.

    By blocks rather than through one ``triu_indices(dim, dim)``: its index tensors, for a d = 11008 Gram, take 1 GB.
    """
    packed_start = 0
    for start in range(0, height, ROW_BLOCK):
        stop = min(start + ROW_BLOCK, height)
        rows, cols = torch.triu_indices(stop - start, span - start, device=device)
        packed_stop = packed_start + rows.numel()
        yield start, stop, packed_start, packed_stop, rows, cols
        packed_start = packed_stop


def pack_upper(full: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a square matrix, row by row, as a vector of d(d+1)/2."""
    return pack_band(full)


def pack_band(band: torch.Tensor) -> torch.Tensor:
    """The upper-triangle part of a band of rows of a symmetric matrix, row by row: ``band`` holds ``h`` rows from
    the diagonal on (row ``i`` of the band starts at its diagonal entry ``band[i, i]``), ``h x w`` with ``w >= h``.
    The packed triangle of a matrix is its bands' packings, one after another."""
    height, span = band.shape
    packed = torch.empty(height * span - height * (height - 1) // 2, dtype=band.dtype, device=band.device)
    for start, stop, begin, end, rows, cols in _row_blocks(height, span, band.device):
        packed[begin:end] = band[start:stop, start:][rows, cols]
    return packed


def packed_diagonal(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """The diagonal of the symmetric matrix whose upper triangle (row by row) is ``packed``."""
    rows = torch.arange(dim, device=packed.device)
    return packed[rows * dim - rows * (rows - 1) // 2]


def unpack_upper(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``packed``, built in place (no d x d temporaries)."""
    if packed.numel() != dim * (dim + 1) // 2:
        raise ValueError(f"a packed triangle of dimension {dim} has {dim * (dim + 1) // 2} entries, not {packed.numel()}")
    full = torch.empty(dim, dim, dtype=packed.dtype, device=packed.device)
    for start, stop, begin, end, rows, cols in _row_blocks(dim, dim, full.device):
        block = full[start:stop, start:]
        block[rows, cols] = packed[begin:end]
        full[start:stop, :start] = full[:start, start:stop].T  # mirrored from the rows above, already filled
        square = full[start:stop, start:stop]
        square.copy_(square.triu() + square.triu(1).T)
    return full


@dataclass(frozen=True)
class ModuleInfo:
    gram: str  # key of the Gram this module's input shares
    kind: str  # "linear" (weight is out x in) or "conv1d" (weight is in x out)
    weight: str  # name of the weight in the model's checkpoint (for a tied LM head, the embeddings' name)

    def tied_to(self, module: str) -> bool:
        """Whether this layer's weight is stored under another layer's name (a tied LM head)."""
        return self.weight != f"{module}.weight"


@dataclass
class GramStatistics:
    """Sums of Gram matrices and counts of one owner. Sums, not means: they stay exact under aggregation."""

    grams: dict[str, torch.Tensor]  # key -> packed upper triangle, float64
    dims: dict[str, int]
    token_counts: dict[str, int]
    pads_excluded: dict[str, bool]
    modules: dict[str, ModuleInfo]
    example_count: int
    fingerprint: str
    settings: dict[str, Any] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] | None = None  # parameter -> sum over examples of squared score
    fisher_example_count: int = 0
    gram_dtype: str = "float64"  # dtype of the per-batch products; sums are float64 either way
    privacy: dict[str, Any] | None = None  # a differentially private release: its noise (fusion.privacy.Release)
    clipped_examples: int = 0  # under DP, the examples scaled down by clipping: for the site's eyes, never saved

    @property
    def noise_std(self) -> float:
        """The standard deviation of the noise on each packed Gram entry (0.0 for exact statistics)."""
        return float(self.privacy["noise_std"]) if self.privacy else 0.0

    def full_gram(self, key: str) -> torch.Tensor:
        return unpack_upper(self.grams[key], self.dims[key])

    def modules_by_gram(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for name, info in self.modules.items():
            groups.setdefault(info.gram, []).append(name)
        return groups

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "example_count": self.example_count,
            "fisher_example_count": self.fisher_example_count,
            "gram_dtype": self.gram_dtype,
            "grams": {
                key: {"dim": self.dims[key], "tokens": self.token_counts[key], "pads_excluded": self.pads_excluded[key]}
                for key in self.grams
            },
            "modules": {name: asdict(info) for name, info in self.modules.items()},
            "settings": self.settings,
            **({"privacy": self.privacy} if self.privacy else {}),
        }


class WeightsDigest:
    """A SHA-256 over names, dtypes, shapes and bytes of tensors added in name order."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        self._digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        self._digest.update(tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b"")  # no copy

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """The :class:`WeightsDigest` of every tensor of ``state``, in name order."""
    digest = WeightsDigest()
    for name in sorted(state):
        digest.add(name, state[name])
    return digest.hexdigest()


def save_statistics(stats: GramStatistics, path: str | Path) -> Path:
    """Written tensor by tensor (``safetensors.torch.save_file`` would hold a second copy of every Gram while it
    serialises them all at once), and atomically."""
    from .checkpoint import TensorFile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = TensorFile(path.with_name(path.name + ".data.partial"))
    try:
        for key, gram in stats.grams.items():
            writer.add(GRAM_PREFIX + key, gram)
        for name, value in (stats.fisher or {}).items():
            writer.add(FISHER_PREFIX + name, value)
        writer.close(partial, metadata={METADATA_KEY: json.dumps(stats.metadata())})
    except BaseException:  # a full disk, an interrupt: no half-written file is left, under any name
        writer.discard()
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)  # never leave a half-written statistics file under the real name
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a statistics file, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise StatisticsError(f"{path}: no statistics file (run `gramfuse stats` on this model first)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except Exception as error:  # safetensors raises its own error types for truncated or corrupt headers
        raise StatisticsError(f"{path}: not a readable statistics file (corrupt or truncated): {error}") from error
    if raw is None:
        raise StatisticsError(f"{path}: safetensors file without gramfuse metadata")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as error:
        raise StatisticsError(f"{path}: gramfuse metadata is not valid JSON: {error}") from error
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise StatisticsError(f"{path}: statistics format version {version!r}; this gramfuse reads {FORMAT_VERSION}")
    for required in ("fingerprint", "example_count", "grams", "modules"):
        if required not in meta:
            raise StatisticsError(f"{path}: metadata lacks {required!r}")
    return meta


def load_statistics(path: str | Path) -> GramStatistics:
    """Read and check a statistics file: every Gram present, of the right size, finite; counts consistent."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors' own error types for data that is cut short or damaged
        raise StatisticsError(f"{path}: corrupt or truncated statistics data: {error}") from error
    return statistics_from(str(path), meta, tensors)


class _FileTensors(Mapping):
    """The tensors of a statistics file under one prefix, read (and checked by ``check``) each time one is asked for."""

    def __init__(self, path: Path, source: str, prefix: str, names: list[str], check) -> None:
        self.path, self.source, self.prefix, self.names, self.check = path, source, prefix, names, check

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                value = handle.get_tensor(self.prefix + name)
        except Exception as error:  # safetensors' own error types for data that is cut short or damaged
            raise StatisticsError(f"{self.source}: {name!r}: corrupt or truncated statistics data: {error}") from error
        self.check(name, value)
        return value.to(torch.float64) if self.prefix == GRAM_PREFIX else value

    def __contains__(self, name: object) -> bool:
        return name in self.names  # from the metadata: Mapping's own would read the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def open_statistics(path: str | Path, owner: str | None = None) -> GramStatistics:
    """A statistics file whose Grams and Fisher are read only when a merge asks for them, one at a time.

    The metadata and the tensors' presence and shapes are checked now; NaN or Inf when a tensor is read. Every error
    message starts with the ``owner`` (where given) and the file.
    """
    path = Path(path)
    source = f"owner {owner!r}: {path}" if owner else str(path)
    try:
        meta = read_metadata(path)
    except StatisticsError as error:
        raise StatisticsError(f"owner {owner!r}: {error}" if owner else str(error)) from error
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
    except Exception as error:
        raise StatisticsError(f"{path}: not a readable statistics file (corrupt or truncated): {error}") from error
    odd = next((name for name, dtype in dtypes.items() if name.startswith(GRAM_PREFIX) and dtype not in ("F32", "F64")),
               None)
    if odd is not None:
        raise StatisticsError(f"{source}: layer {odd[len(GRAM_PREFIX):]!r}: Gram stored as {dtypes[odd]}; only "
                              "float32 and float64 Grams are merged (float16 loses the sums' precision)")
    placeholders = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    stats = statistics_from(source, meta, placeholders, check_values=False)

    def check_gram(key: str, gram: torch.Tensor) -> None:
        _check_gram(source, key, gram, meta["grams"][key], noise_std=stats.noise_std)

    def check_fisher(name: str, value: torch.Tensor) -> None:
        _check_fisher(source, name, value)

    stats.grams = _FileTensors(path, source, GRAM_PREFIX, list(stats.grams), check_gram)
    if stats.fisher:
        stats.fisher = _FileTensors(path, source, FISHER_PREFIX, list(stats.fisher), check_fisher)
    return stats


def statistics_from(source: str, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                    check_values: bool = True) -> GramStatistics:
    """Statistics from their metadata and tensors (``gram.<key>``, ``fisher.<name>``; others ignored), all checked
    (without ``check_values``, shapes only: the tensors may be placeholders on the meta device).

    ``source`` (a file, an owner) starts every error message.
    """
    try:
        grams = {}
        privacy = meta.get("privacy")
        noise_std = float(privacy["noise_std"]) if privacy else 0.0
        if not (math.isfinite(noise_std) and noise_std >= 0.0):
            raise StatisticsError(f"{source}: the privacy record's noise standard deviation is {noise_std}")
        if noise_std > 0.0:
            _check_release(source, privacy)
        for key, info in meta["grams"].items():
            gram = tensors.get(GRAM_PREFIX + key)
            if gram is None:
                raise StatisticsError(f"{source}: layer {key!r}: Gram listed in the metadata but missing")
            _check_gram(source, key, gram, info, check_values, noise_std)
            grams[key] = gram.to(torch.float64) if check_values else gram
        fisher = {name[len(FISHER_PREFIX) :]: value for name, value in tensors.items() if name.startswith(FISHER_PREFIX)}
        for name, value in fisher.items() if check_values else ():
            _check_fisher(source, name, value)
        modules = {name: ModuleInfo(**info) for name, info in meta["modules"].items()}
        for name, info in modules.items():
            if info.gram not in grams:
                raise StatisticsError(f"{source}: layer {name!r} refers to Gram {info.gram!r}, which is missing")
        examples = _count(source, "the example count", meta["example_count"], minimum=1)
        return GramStatistics(
            grams=grams,
            dims={key: int(info["dim"]) for key, info in meta["grams"].items()},
            # Every example has a real token, and every Gram counts each example's real tokens (or its pooled one).
            token_counts={key: _count(source, f"layer {key!r}: the token count", info["tokens"], minimum=examples)
                          for key, info in meta["grams"].items()},
            pads_excluded={key: bool(info.get("pads_excluded", True)) for key, info in meta["grams"].items()},
            modules=modules,
            example_count=examples,
            fingerprint=str(meta["fingerprint"]),
            settings=dict(meta.get("settings", {})),
            fisher=fisher or None,
            fisher_example_count=int(meta.get("fisher_example_count", 0)),
            gram_dtype=_gram_dtype(source, meta.get("gram_dtype", "float64")),
            privacy=privacy,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise StatisticsError(f"{source}: malformed statistics metadata ({type(error).__name__}: {error})") from error


def _check_release(source: str, release: Mapping[str, Any]) -> None:
    """A noisy file's privacy record must say what its draw cost (the site's budget charges it)."""
    problems = [name for name, ok in (
        ("draw", isinstance(release.get("draw"), str) and bool(release.get("draw"))),
        ("noise_multiplier", isinstance(release.get("noise_multiplier"), (int, float))
         and release["noise_multiplier"] > 0),
        ("delta", isinstance(release.get("delta"), (int, float)) and 0 < release["delta"] < 1),
        ("epsilon", isinstance(release.get("epsilon"), (int, float)) and release["epsilon"] > 0),
    ) if not ok]
    if problems:
        raise StatisticsError(f"{source}: the privacy record lacks a valid {', '.join(problems)}")


def _count(source: str, what: str, value: Any, minimum: int) -> int:
    """A count from the metadata: a whole number of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise StatisticsError(f"{source}: {what} is {value!r}, not a whole number")
    if value < minimum:
        raise StatisticsError(f"{source}: {what} is {int(value)}, below {minimum}" + (
            " (every example has a real token)" if minimum > 1 else ""))
    return int(value)


def check_layers(source: str, stats: GramStatistics, shapes: Mapping[str, tuple],
                 kinds: Mapping[str, str] | None = None) -> None:
    """Each hooked layer against the model it is merged into: its kind (where ``kinds`` gives the model's) and its
    input width, which must be its Gram's dimension. Statistics of another model, or a layer read with the wrong
    kind, would otherwise be merged transposed or fail deep in a solve."""
    from .gram import CONV1D

    for module, info in stats.modules.items():
        if kinds is not None and module in kinds and kinds[module] != info.kind:
            raise StatisticsError(f"{source}: layer {module!r} is a {kinds[module]} layer in the model, but the "
                                  f"statistics say {info.kind}")
        shape = shapes.get(info.weight)
        if shape is None:
            continue
        if len(shape) != 2:
            raise StatisticsError(f"{source}: layer {module!r}: weight {info.weight!r} has shape {tuple(shape)}, "
                                  "not a matrix")
        width = shape[0] if info.kind == CONV1D else shape[1]
        if width != stats.dims[info.gram]:
            raise StatisticsError(f"{source}: layer {module!r}: its Gram {info.gram!r} has dimension "
                                  f"{stats.dims[info.gram]}, but the layer's input is {width} wide (statistics of "
                                  "another model?)")


def _gram_dtype(source: str, name: str) -> str:
    if name not in ("float64", "float32"):
        raise StatisticsError(f"{source}: unknown gram_dtype {name!r}")
    return name


def _check_fisher(source: str, name: str, value: torch.Tensor) -> None:
    if not all_finite(value):
        raise StatisticsError(f"{source}: parameter {name!r}: Fisher holds NaN or Inf")


def _check_gram(source: str, key: str, gram: torch.Tensor, info: Mapping[str, Any], check_values: bool = True,
                noise_std: float = 0.0) -> None:
    dim = int(info["dim"])
    if check_values and gram.dtype not in (torch.float32, torch.float64):
        raise StatisticsError(f"{source}: layer {key!r}: Gram stored as {str(gram.dtype).removeprefix('torch.')}; "
                              "only float32 and float64 Grams are merged (float16 loses the sums' precision)")
    if gram.dim() != 1 or gram.numel() != dim * (dim + 1) // 2:
        raise StatisticsError(
            f"{source}: layer {key!r}: Gram has shape {tuple(gram.shape)}, expected a packed triangle of "
            f"{dim * (dim + 1) // 2} entries for input dimension {dim}"
        )
    if check_values and not all_finite(gram):
        raise StatisticsError(f"{source}: layer {key!r}: Gram holds NaN or Inf")
    # A differentially private Gram carries Gaussian noise, its diagonal too; beyond TAIL_SIGMAS it is not noise.
    if check_values and bool((packed_diagonal(gram, dim) < -TAIL_SIGMAS * noise_std).any()):
        raise StatisticsError(f"{source}: layer {key!r}: Gram has negative diagonal entries (sums of squares "
                              "cannot be negative: not a Gram of real inputs)")
