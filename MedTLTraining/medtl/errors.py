"""User-facing errors: each carries one line saying what is wrong and where.

``exit_code`` is what the ``medtl`` command returns for the error: 2 for input the user can
correct (a config field, a file, a CSV row, an output path), 1 for a failure of the run itself
(a full disk, a permission, memory, a training that diverged).
"""


class MedTLError(Exception):
    """Base class for problems the user can fix (bad config, missing file, bad data).

    The command line prints ``str(error)`` as one line and exits with :attr:`exit_code`, without
    a traceback.
    """

    exit_code = 2


class ConfigError(MedTLError):
    """An unknown or invalid configuration field."""


class DataError(MedTLError):
    """A missing or unreadable image, label or dataset row."""


class WeightsError(MedTLError):
    """Pretrained weights that cannot be found or whose hash does not match."""


class OutputError(MedTLError):
    """An output path that cannot be written as asked (unknown format, an input file, a folder
    that holds another run)."""


class RunFailure(MedTLError):
    """The run itself failed (disk full, permission denied, out of memory, a non-finite loss):
    the input may be fine, so the exit status is 1."""

    exit_code = 1
