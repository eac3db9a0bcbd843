"""gramfuse's engine: Gram statistics, merge methods, the statistics file, the offline CLI.

Pure library: torch, numpy, safetensors and transformers; never Flower, no networking.
"""

from .errors import CompatibilityError, DataError, GramfuseError, MergeError, StatisticsError
from .gram import collect_statistics
from .merge import merge_folders, merge_states
from .methods import METHODS, MergeContext, MergeMethod, OwnerState, get_method, register
from .statistics import STATS_FILENAME, GramStatistics, load_statistics, save_statistics

__all__ = [
    "METHODS",
    "STATS_FILENAME",
    "CompatibilityError",
    "DataError",
    "GramStatistics",
    "GramfuseError",
    "MergeContext",
    "MergeError",
    "MergeMethod",
    "OwnerState",
    "StatisticsError",
    "collect_statistics",
    "get_method",
    "load_statistics",
    "merge_folders",
    "merge_states",
    "register",
    "save_statistics",
]
