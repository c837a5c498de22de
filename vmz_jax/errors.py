"""Error types raised by vmz_jax and porting; the CLI turns them into one-line messages."""


class VMZError(Exception):
    """Base class of every error this project raises on purpose."""


class CheckpointError(VMZError):
    """A weights file is unreadable, unsafe, or does not fit the architecture."""


class DownloadError(VMZError):
    """A checkpoint could not be fetched or verified."""
