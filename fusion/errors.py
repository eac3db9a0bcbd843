"""Errors that name what went wrong, for whom and where.

Every error a user can cause with bad input is a :class:`GramfuseError`; the CLI prints its message on stderr and
exits non-zero. Messages name the owner (model folder) or file, the layer, and the problem.
"""


class GramfuseError(Exception):
    """Base class of every error caused by bad input rather than by a bug.

    ``public``: the same problem told without any value of the data or statistics (naming the tensor, the step), for
    a data site to send to the server where the full message would give one away (:mod:`clients.app`)."""

    def __init__(self, *args: object, public: str | None = None) -> None:
        super().__init__(*args)
        self.public = public


class DataError(GramfuseError):
    """A data file is missing, empty, malformed, or holds a label the model cannot predict."""


class StatisticsError(GramfuseError):
    """A statistics file is corrupt, truncated, inconsistent, non-finite, or was made from other weights."""


class CompatibilityError(GramfuseError):
    """Owners whose models cannot be merged: other architectures, shapes, or label sets."""


class MergeError(GramfuseError):
    """A merge that cannot go ahead: unknown method or option, missing inputs, non-finite weights."""
