"""Resumable, checksum-verified, atomic, inter-process-safe downloads (stdlib only).

``download(url, dest)`` streams into ``<dest>.part``, resumes it with an HTTP ``Range`` request
after a failure, verifies the sha256 (full or prefix) of the complete file and only then renames it
to ``dest``. An ``fcntl.flock`` lock on ``<dest>.lock`` is held throughout, so a second process
asking for the same file waits and then finds it done. Every failure is a one-line
``DownloadError``.

Environment: ``VMZ_JAX_HOME`` (cache root, default ``~/.cache/vmz_jax``), ``VMZ_JAX_OFFLINE=1``
(never touch the network), ``VMZ_JAX_PROGRESS=1``/``0`` (force the progress bar on/off regardless
of whether stderr is a TTY).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from vmz_jax.errors import DownloadError, one_line
from vmz_jax.files import fsync_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no inter-process lock
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "RETRY_BACKOFF_S",
    "cache_dir",
    "download",
    "file_lock",
    "is_offline",
    "lock_path",
    "part_path",
    "sha256_file",
]

#: Base of the exponential backoff between attempts (seconds); attempt k waits base * 2**(k-1).
RETRY_BACKOFF_S: float = 1.0
#: Upper bound of one backoff wait (seconds).
RETRY_BACKOFF_MAX_S: float = 30.0
#: Largest read from the socket per iteration.
CHUNK_SIZE: int = 1 << 20

OFFLINE_ENV = "VMZ_JAX_OFFLINE"
HOME_ENV = "VMZ_JAX_HOME"
PROGRESS_ENV = "VMZ_JAX_PROGRESS"

OFFLINE_HINT = (
    "download it elsewhere and pass checkpoint=PATH to vmz_jax.load (CLI: vmz-jax port PATH DIR)"
)

_USER_AGENT = "vmz-jax/0.1 (+urllib)"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_HEX = re.compile(r"[0-9a-f]+")
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")
# errno values that mean "this machine has no route to the network", as opposed to a flaky server.
_NO_NETWORK_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN}


def cache_dir() -> Path:
    """Root of the download cache: ``$VMZ_JAX_HOME`` or ``~/.cache/vmz_jax`` (not created here)."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "vmz_jax"


def is_offline() -> bool:
    """True when ``VMZ_JAX_OFFLINE`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in _TRUE


def part_path(dest: Path) -> Path:
    """Where ``download`` streams ``dest`` before it is verified: ``<dest>.part``."""
    dest = Path(dest)
    return dest.with_suffix(dest.suffix + ".part")


def lock_path(dest: Path) -> Path:
    """The lock file guarding ``dest``: ``<dest>.lock`` (``model.pth`` -> ``model.pth.lock``)."""
    dest = Path(dest)
    return dest.with_suffix(dest.suffix + ".lock")


@contextlib.contextmanager
def file_lock(
    path: Path,
    *,
    timeout: float | None = None,
    poll_s: float = 0.05,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[Path]:
    """Hold an exclusive inter-process lock for ``path`` (an ``flock`` on ``lock_path(path)``).

    Blocks until the lock is free (calling ``on_wait()`` once if it has to wait), or raises
    ``TimeoutError`` after ``timeout`` seconds. The lock is released when the block exits or the
    process dies. The lock file is left in place (deleting it would race with a process waiting on
    it). Yields the lock file's path.
    """
    lock = lock_path(Path(path))
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            _acquire(fd, lock, timeout, poll_s, on_wait)
        try:
            yield lock
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(
    fd: int, lock: Path, timeout: float | None, poll_s: float, on_wait: Callable[[], None] | None
) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        if on_wait is not None:
            on_wait()
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"could not lock {lock} within {timeout:g} s") from None
            time.sleep(poll_s)


def sha256_file(path: Path, *, chunk_size: int = CHUNK_SIZE) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Progress bar


def _progress_enabled(progress: bool) -> bool:
    env = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if env in _FALSE:
        return False
    if env in _TRUE:
        return True
    if not progress:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


class _Progress:
    """A plain-text line on stderr, ``name: done/total MB (pct) rate MB/s``, redrawn with CR."""

    def __init__(self, label: str, stream: IO[str], interval_s: float = 0.2) -> None:
        self.label = label
        self.stream = stream
        self.interval_s = interval_s
        self.total: int | None = None
        self.done = 0
        self._session_start_bytes = 0
        self._t0 = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def start(self, done: int, total: int | None) -> None:
        self.done, self.total = done, total
        self._session_start_bytes = done
        self._t0 = time.monotonic()
        self._draw(force=True)

    def update(self, done: int) -> None:
        self.done = done
        self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self.interval_s:
            return
        self._last_draw = now
        elapsed = max(now - self._t0, 1e-6)
        rate = (self.done - self._session_start_bytes) / elapsed / 1e6
        if self.total:
            pct = 100.0 * self.done / self.total
            size = f"{_mb(self.done)}/{_mb(self.total)} MB ({pct:5.1f}%)"
        else:
            size = f"{_mb(self.done)} MB"
        self.stream.write(f"\r{self.label}: {size} {rate:.2f} MB/s ")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------------------------------
# Errors


class _Retryable(Exception):
    """A transient failure (timeout, reset, 5xx, truncated body): try again, resuming."""


class _Restart(Exception):
    """The part file cannot be resumed (server ignored or refused the range): start from zero."""


def _os_msg(e: OSError) -> str:
    return one_line(e.strerror or e)


def _is_no_network(reason: object) -> bool:
    if isinstance(reason, socket.gaierror):
        return True
    return isinstance(reason, OSError) and reason.errno in _NO_NETWORK_ERRNOS


def _check_hex(value: str | None, what: str, exact_len: int | None) -> str | None:
    if value is None:
        return None
    v = value.strip().lower()
    if not v or not _HEX.fullmatch(v) or len(v) > 64 or (exact_len and len(v) != exact_len):
        need = f"{exact_len} hex digits" if exact_len else "1 to 64 hex digits"
        raise ValueError(f"{what} must be {need}, got {value!r}")
    return v


# --------------------------------------------------------------------------------------------------
# Download


def download(
    url: str,
    dest: Path,
    *,
    sha256_prefix: str | None = None,
    sha256: str | None = None,
    timeout: float = 30,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` (resumable, verified, atomic, locked) and return ``dest``.

    If ``dest`` already exists (and matches the checksum, when one is given) nothing is fetched; a
    cached file that fails the checksum is replaced. A resumed ``.part`` that fails the checksum is
    fetched once more from zero before giving up.

    ``retries`` is the number of further attempts after a transient failure (timeout, connection
    reset, truncated body, HTTP 5xx/408/429); each waits ``RETRY_BACKOFF_S * 2**k`` seconds and
    resumes the ``.part`` file with a ``Range`` request. Other HTTP 4xx errors (404, 403, ...) fail
    at once, as does a missing network (DNS failure, no route). ``progress`` draws a bar on stderr
    when it is a TTY (``VMZ_JAX_PROGRESS=1``/``0`` overrides). Raises ``DownloadError`` with a
    one-line message; ``ValueError`` for malformed checksum arguments.
    """
    dest = Path(dest)
    want_prefix = _check_hex(sha256_prefix, "sha256_prefix", None)
    want_full = _check_hex(sha256, "sha256", 64)
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    # Fast path, no lock: ``dest`` only ever appears complete (atomic rename).
    if dest.exists() and _verify(dest, want_prefix, want_full) is None:
        return dest

    show = _progress_enabled(progress)

    def on_wait() -> None:
        if show:
            print(f"waiting for another process downloading {dest.name} ...", file=sys.stderr)

    with contextlib.ExitStack() as stack:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(file_lock(dest, on_wait=on_wait))
        except OSError as e:
            raise DownloadError(
                f"cannot download {url}: cannot lock {dest}: {_os_msg(e)}"
            ) from None
        # Another process may have finished it while we waited for the lock.
        if dest.exists():
            if _verify(dest, want_prefix, want_full) is None:
                return dest
            dest.unlink()  # a corrupt cached copy: fetch it again
        if is_offline():
            raise DownloadError(f"cannot download {url}: offline ({OFFLINE_ENV}=1); {OFFLINE_HINT}")

        part = part_path(dest)
        bar = _Progress(dest.name, sys.stderr) if show else None
        resumed = part.exists()
        try:
            _fetch_with_retries(url, part, timeout=timeout, retries=retries, bar=bar)
            mismatch = _verify(part, want_prefix, want_full)
            if mismatch is not None and resumed:
                # The stale part (an interrupted download of another version?) may be the culprit.
                part.unlink(missing_ok=True)
                _fetch_with_retries(url, part, timeout=timeout, retries=retries, bar=bar)
                mismatch = _verify(part, want_prefix, want_full)
        finally:
            if bar is not None:
                bar.close()
        if mismatch is not None:
            part.unlink(missing_ok=True)
            expected, actual = mismatch
            raise DownloadError(
                f"checksum mismatch for {url}: expected sha256 {expected}, got {actual}; "
                "the download was discarded"
            )
        os.replace(part, dest)
        fsync_dir(dest.parent)
    return dest


def _verify(path: Path, prefix: str | None, full: str | None) -> tuple[str, str] | None:
    """None if ``path`` matches; else (expected, actual) shown at the expected's length."""
    if prefix is None and full is None:
        return None
    actual = sha256_file(path)
    for expected in (full, prefix):
        if expected is not None and not actual.startswith(expected):
            return expected, actual[: max(len(expected), 8)]
    return None


def _fetch_with_retries(
    url: str, part: Path, *, timeout: float, retries: int, bar: _Progress | None
) -> None:
    attempts = retries + 1
    restarts = 0
    attempt = 0
    while True:
        attempt += 1
        try:
            _fetch_once(url, part, timeout=timeout, bar=bar)
            return
        except _Restart:
            # Not a network failure; bounded separately so a broken server cannot loop us forever.
            part.unlink(missing_ok=True)
            restarts += 1
            attempt -= 1
            if restarts > attempts:
                raise DownloadError(
                    f"cannot download {url}: the server keeps refusing to resume or restart"
                ) from None
        except _Retryable as e:
            if attempt >= attempts:
                tries = f"{attempts} attempt" + ("s" if attempts != 1 else "")
                raise DownloadError(
                    f"cannot download {url}: {e} ({tries}); retry later or {OFFLINE_HINT}"
                ) from None
            wait = min(RETRY_BACKOFF_S * 2 ** (attempt - 1), RETRY_BACKOFF_MAX_S)
            if wait > 0:
                time.sleep(wait)


def _fetch_once(url: str, part: Path, *, timeout: float, bar: _Progress | None) -> None:
    """One HTTP request; appends to ``part``. Raises _Retryable, _Restart or DownloadError."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    timed_out = f"timed out after {timeout:g} s"
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        with contextlib.closing(e):
            _handle_http_error(url, e, offset)
        return  # 416 for a part that is already complete: the checksum decides
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError):
            raise _Retryable(timed_out) from None
        if _is_no_network(reason):
            raise DownloadError(
                f"cannot download {url}: network unreachable ({one_line(reason)}); {OFFLINE_HINT}"
            ) from None
        raise _Retryable(one_line(reason)) from None
    except TimeoutError:
        raise _Retryable(timed_out) from None
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        raise _Retryable(one_line(e) or type(e).__name__) from None

    with contextlib.closing(response):
        status = response.status
        total: int | None
        if status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                raise _Restart
        elif status == 200:
            if offset > 0:  # the server ignored Range: start over
                part.unlink(missing_ok=True)
                offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise DownloadError(f"HTTP {status} for {url}: unexpected status")

        if bar is not None:
            bar.start(offset, total)
        done = offset
        try:
            f = open(part, "ab")  # noqa: SIM115 - closed below
        except OSError as e:
            raise DownloadError(
                f"cannot download {url}: cannot write {part}: {_os_msg(e)}"
            ) from None
        with f:
            while True:
                try:
                    chunk = response.read1(CHUNK_SIZE)
                except TimeoutError:
                    raise _Retryable(timed_out) from None
                except (ConnectionError, http.client.HTTPException, OSError) as e:
                    raise _Retryable(one_line(e) or type(e).__name__) from None
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as e:
                    raise DownloadError(
                        f"cannot download {url}: cannot write {part}: {_os_msg(e)}"
                    ) from None
                done += len(chunk)
                if bar is not None:
                    bar.update(done)
            f.flush()
            os.fsync(f.fileno())

    if total is not None and done != total:
        if done > total:
            raise _Restart
        raise _Retryable(f"connection closed after {done} of {total} bytes")


def _handle_http_error(url: str, e: urllib.error.HTTPError, offset: int) -> None:
    """Return if a 416 says the part is complete; otherwise raise."""
    code = e.code
    reason = f" ({one_line(e.reason)})" if e.reason else ""
    if code == 416:
        # Range not satisfiable: the part is complete, or longer than the file / stale.
        _, total = _parse_content_range(e.headers.get("Content-Range"))
        if offset > 0 and total == offset:
            return  # complete: the checksum (if any) decides
        raise _Restart
    if code >= 500 or code in (408, 429):
        raise _Retryable(f"HTTP {code}{reason}")
    raise DownloadError(f"HTTP {code} for {url}{reason}")


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes a-b/N`` -> (a, N); ``bytes */N`` -> (None, N); unknown parts are None."""
    if not value:
        return None, None
    m = _CONTENT_RANGE.fullmatch(value.strip())
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return start, total
