"""User-facing errors: each carries one line saying what is wrong and where."""


class MedTLError(Exception):
    """Base class for problems the user can fix (bad config, missing file, bad data).

    The command line prints ``str(error)`` as one line and exits non-zero, without a traceback.
    """


class ConfigError(MedTLError):
    """An unknown or invalid configuration field."""


class DataError(MedTLError):
    """A missing or unreadable image, label or dataset row."""


class WeightsError(MedTLError):
    """Pretrained weights that cannot be found or whose hash does not match."""
