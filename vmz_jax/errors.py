"""Error types raised by vmz_jax and porting; the CLI turns them into one-line messages."""


class VMZError(Exception):
    """Base class of every error this project raises on purpose."""


class CheckpointError(VMZError):
    """A weights file is unreadable, unsafe, or does not fit the architecture."""


class DownloadError(VMZError):
    """A checkpoint could not be fetched or verified."""


#: The longest message a one-line error shows; longer ones are cut with "...".
MESSAGE_LIMIT = 600


def one_line(text: object, limit: int = MESSAGE_LIMIT) -> str:
    """`text` on one line (whitespace runs collapsed), cut to `limit` characters.

    Long messages are mostly lists of problems joined by "; ": they are cut after the last whole
    item that fits (when that keeps at least half), so that no item is shown half."""
    line = " ".join(str(text).split())
    if len(line) <= limit:
        return line
    cut = line.rfind("; ", 0, limit - 4)
    return line[:cut] + "; ..." if cut >= limit // 2 else line[: limit - 3] + "..."
