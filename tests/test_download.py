"""vmz_jax.download against a local HTTP server (127.0.0.1 only) that misbehaves on request."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import re
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmz_jax.errors import DownloadError
from vmz_jax.weights import download as dl

MAX_REQUESTS = 64  # per test: the server answers 503 after that, whatever the client does
WATCHDOG_S = 60.0  # the server shuts itself down after this long, whatever the test does


def make_payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Behaviour:
    """What the server does; one-shot faults apply to the first request only."""

    payload: bytes = b""
    status: int | None = None  # answer every request with this HTTP error
    fail_first: int = 0  # answer the first N requests 503
    drop_after: int | None = None  # first request: send this many body bytes, then hang up
    drop_mode: str = "eof"  # "eof": close cleanly; "reset": TCP RST
    stall_s: float = 0.0  # sleep this long before answering (requests < stall_count)
    stall_count: int = 0
    stall_after_bytes: int | None = None  # first request: stall after this many body bytes
    ignore_range: bool = False  # always 200 with the full body
    corrupt: bool = False  # serve the payload with its first byte flipped
    chunk_delay_s: float = 0.0  # sleep between 64 KiB chunks (a slow server)
    requests: list[dict[str, str | None]] = field(default_factory=list)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behaviour = Behaviour()
        self.lock = threading.Lock()
        self.release = threading.Event()  # set at teardown: ends every stall at once
        self.first_request = threading.Event()

    def configure(self, **kwargs: object) -> Behaviour:
        self.behaviour = Behaviour(**kwargs)  # type: ignore[arg-type]
        self.first_request.clear()
        return self.behaviour

    def url(self, path: str = "/weights-0123abcd.pth") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up on purpose are the point of these tests

    @property
    def gets(self) -> list[dict[str, str | None]]:
        return self.behaviour.requests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # no handler thread outlives a silent client by more than this
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv, b = self.server, self.server.behaviour
        with srv.lock:
            n = len(b.requests)
            b.requests.append({"path": self.path, "range": self.headers.get("Range")})
        srv.first_request.set()
        self.close_connection = True
        if n >= MAX_REQUESTS:
            return self._error(503)
        if n < b.stall_count and srv.release.wait(b.stall_s):
            return
        if b.status is not None:
            return self._error(b.status)
        if n < b.fail_first:
            return self._error(503)

        body = b.payload
        if b.corrupt and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        total, start = len(body), 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and not b.ignore_range:
            start = int(m.group(1))
            if start >= total:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(total - start))
        self.end_headers()
        body = body[start:]

        if n == 0 and b.drop_after is not None:
            self.wfile.write(body[: b.drop_after])
            self.wfile.flush()
            if b.drop_mode == "reset":
                time.sleep(0.2)  # let the client read what was sent before the RST
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()
            return
        if n == 0 and b.stall_after_bytes is not None:
            self.wfile.write(body[: b.stall_after_bytes])
            self.wfile.flush()
            srv.release.wait(b.stall_s)
            return
        step = 1 << 16
        for i in range(0, len(body), step):
            self.wfile.write(body[i : i + step])
            if b.chunk_delay_s:
                time.sleep(b.chunk_delay_s)

    def _error(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextmanager
def running_server() -> Iterator[_Server]:
    """A `_Server` on 127.0.0.1 that shuts itself down after WATCHDOG_S seconds at the latest."""
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(WATCHDOG_S, srv.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield srv
    finally:
        watchdog.cancel()
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture
def server():
    with running_server() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fast_and_local(monkeypatch, tmp_path):
    monkeypatch.setattr(dl, "RETRY_BACKOFF_S", 0.01)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for var in (dl.OFFLINE_ENV, dl.PROGRESS_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(dl.HOME_ENV, str(tmp_path / "home"))


def assert_clean(dest: Path) -> None:
    assert not dest.exists()
    assert not dl.part_path(dest).exists()


# ---- the happy path ----------------------------------------------------------------------------


def test_download_verifies_and_then_uses_the_cached_file(server, tmp_path):
    data = make_payload(300_000)
    server.configure(payload=data)
    dest = tmp_path / "sub" / "w.pth"
    assert dl.download(server.url(), dest, sha256=sha(data), progress=False) == dest
    assert dest.read_bytes() == data
    assert not dl.part_path(dest).exists()
    assert [r["range"] for r in server.gets] == [None]
    # Second call: served from disk, no request.
    assert dl.download(server.url(), dest, sha256_prefix=sha(data)[:8], progress=False) == dest
    assert len(server.gets) == 1


def test_no_checksum_given_is_accepted(server, tmp_path):
    data = make_payload(1000, seed=3)
    server.configure(payload=data)
    dest = dl.download(server.url(), tmp_path / "x.bin", progress=False)
    assert dest.read_bytes() == data


def test_empty_file(server, tmp_path):
    server.configure(payload=b"")
    dest = dl.download(server.url(), tmp_path / "e.bin", sha256=sha(b""), progress=False)
    assert dest.read_bytes() == b""


# ---- resuming ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eof", "reset"])
def test_dropped_connection_is_resumed_with_range(server, tmp_path, mode):
    data = make_payload(500_000, seed=1)
    k = 123_457
    server.configure(payload=data, drop_after=k, drop_mode=mode)
    dest = tmp_path / "w.pth"
    dl.download(server.url(), dest, sha256=sha(data), retries=2, progress=False)
    assert dest.read_bytes() == data
    assert len(server.gets) == 2
    assert server.gets[0]["range"] is None
    assert server.gets[1]["range"] == f"bytes={k}-"


def test_existing_part_file_is_resumed(server, tmp_path):
    data = make_payload(200_000, seed=2)
    dest = tmp_path / "w.pth"
    dl.part_path(dest).write_bytes(data[:70_000])
    server.configure(payload=data)
    dl.download(server.url(), dest, sha256=sha(data), progress=False)
    assert dest.read_bytes() == data
    assert [r["range"] for r in server.gets] == ["bytes=70000-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    data = make_payload(200_000, seed=4)
    dest = tmp_path / "w.pth"
    dl.part_path(dest).write_bytes(b"\x00" * 50_000)  # garbage: must not survive
    server.configure(payload=data, ignore_range=True)
    dl.download(server.url(), dest, sha256=sha(data), progress=False)
    assert dest.read_bytes() == data
    assert [r["range"] for r in server.gets] == ["bytes=50000-"]


def test_416_for_an_oversized_part_restarts(server, tmp_path):
    data = make_payload(100_000, seed=5)
    dest = tmp_path / "w.pth"
    dl.part_path(dest).write_bytes(b"\x01" * 150_000)
    server.configure(payload=data)
    dl.download(server.url(), dest, sha256=sha(data), progress=False)
    assert dest.read_bytes() == data
    assert [r["range"] for r in server.gets] == ["bytes=150000-", None]


def test_416_for_a_complete_part_is_accepted_after_verification(server, tmp_path):
    data = make_payload(100_000, seed=6)
    dest = tmp_path / "w.pth"
    dl.part_path(dest).write_bytes(data)
    server.configure(payload=data)
    dl.download(server.url(), dest, sha256_prefix=sha(data)[:8], progress=False)
    assert dest.read_bytes() == data
    assert [r["range"] for r in server.gets] == ["bytes=100000-"]


def test_stale_part_failing_the_checksum_is_fetched_again_from_zero(server, tmp_path):
    data = make_payload(10_000, seed=7)
    dest = tmp_path / "w.pth"
    dl.part_path(dest).write_bytes(b"\x02" * len(data))  # complete size, wrong bytes
    server.configure(payload=data)
    dl.download(server.url(), dest, sha256=sha(data), progress=False)
    assert dest.read_bytes() == data
    assert [r["range"] for r in server.gets] == [f"bytes={len(data)}-", None]


def test_resumed_part_and_refetch_both_wrong_are_refused(server, tmp_path):
    data = make_payload(10_000, seed=7)
    dest = tmp_path / "w.pth"
    dl.part_path(dest).write_bytes(b"\x02" * 5000)
    server.configure(payload=data, corrupt=True)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        dl.download(server.url(), dest, sha256=sha(data), progress=False)
    assert_clean(dest)
    assert [r["range"] for r in server.gets] == ["bytes=5000-", None]


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    size=st.integers(min_value=1, max_value=300_000),
    cut=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_resume_from_any_cut_point(server, size, cut, seed):
    data = make_payload(size, seed)
    k = int(cut * size)
    server.configure(payload=data, drop_after=k)
    with tempfile.TemporaryDirectory() as d:
        dest = Path(d) / "w.pth"
        dl.download(server.url(), dest, sha256=sha(data), retries=1, progress=False)
        assert dest.read_bytes() == data
    assert server.gets[-1]["range"] == (f"bytes={k}-" if k else None)


# ---- retries and failures ----------------------------------------------------------------------


def test_5xx_is_retried(server, tmp_path):
    data = make_payload(10_000, seed=8)
    server.configure(payload=data, fail_first=2)
    dest = dl.download(server.url(), tmp_path / "w.pth", sha256=sha(data), progress=False)
    assert dest.read_bytes() == data
    assert len(server.gets) == 3


def test_5xx_gives_up_after_the_retries(server, tmp_path):
    server.configure(payload=b"x", fail_first=100)
    dest = tmp_path / "w.pth"
    with pytest.raises(DownloadError) as err:
        dl.download(server.url(), dest, retries=2, progress=False)
    msg = str(err.value)
    assert "HTTP 503" in msg and "3 attempts" in msg and server.url() in msg
    assert "\n" not in msg
    assert len(server.gets) == 3
    assert_clean(dest)


@pytest.mark.parametrize("code", [404, 403])
def test_client_errors_fail_at_once(server, tmp_path, code):
    server.configure(payload=b"x", status=code)
    dest = tmp_path / "w.pth"
    with pytest.raises(DownloadError) as err:
        dl.download(server.url(), dest, retries=3, progress=False)
    assert str(err.value).startswith(f"HTTP {code} for {server.url()}")
    assert "\n" not in str(err.value)
    assert len(server.gets) == 1
    assert_clean(dest)


def test_stalled_server_times_out(server, tmp_path):
    server.configure(payload=b"x" * 10, stall_s=5.0, stall_count=100)
    dest = tmp_path / "w.pth"
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        dl.download(server.url(), dest, timeout=0.3, retries=1, progress=False)
    assert time.monotonic() - t0 < 3.0
    assert "timed out after 0.3 s" in str(err.value)
    assert "\n" not in str(err.value)
    assert len(server.gets) == 2
    assert_clean(dest)


def test_stall_mid_body_is_resumed(server, tmp_path):
    data = make_payload(200_000, seed=9)
    server.configure(payload=data, stall_after_bytes=65_536, stall_s=5.0)
    dest = tmp_path / "w.pth"
    dl.download(server.url(), dest, sha256=sha(data), timeout=0.3, retries=1, progress=False)
    assert dest.read_bytes() == data
    assert [r["range"] for r in server.gets] == [None, "bytes=65536-"]


def test_connection_refused_is_retried_then_reported(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.pth"
    with pytest.raises(DownloadError) as err:
        dl.download(url, tmp_path / "w.pth", retries=1, progress=False)
    msg = str(err.value)
    assert "refused" in msg.lower() and "2 attempts" in msg and "vmz-jax port PATH DIR" in msg


# ---- checksums ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["prefix", "full"])
def test_wrong_bytes_are_refused_and_nothing_is_cached(server, tmp_path, kind):
    data = make_payload(100_000, seed=10)
    server.configure(payload=data, corrupt=True)
    dest = tmp_path / "w.pth"
    expected = sha(data) if kind == "full" else sha(data)[:8]
    bad = bytes([data[0] ^ 0xFF]) + data[1:]
    with pytest.raises(DownloadError) as err:
        dl.download(
            server.url(),
            dest,
            progress=False,
            **({"sha256": expected} if kind == "full" else {"sha256_prefix": expected}),
        )
    msg = str(err.value)
    assert "checksum mismatch" in msg and "\n" not in msg
    assert expected in msg and sha(bad)[:8] in msg
    assert_clean(dest)
    assert len(server.gets) == 1


def test_corrupt_cached_file_is_replaced(server, tmp_path):
    data = make_payload(20_000, seed=11)
    dest = tmp_path / "w.pth"
    dest.write_bytes(b"not the weights")
    server.configure(payload=data)
    dl.download(server.url(), dest, sha256_prefix=sha(data)[:8], progress=False)
    assert dest.read_bytes() == data


@pytest.mark.parametrize(
    "kwargs", [{"sha256": "abc"}, {"sha256_prefix": "xyz"}, {"sha256_prefix": ""}]
)
def test_malformed_checksum_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        dl.download("http://127.0.0.1:9/w.pth", tmp_path / "w.pth", **kwargs)


# ---- offline -----------------------------------------------------------------------------------


def test_offline_env_var(server, tmp_path, monkeypatch):
    monkeypatch.setenv(dl.OFFLINE_ENV, "1")
    server.configure(payload=b"abc")
    dest = tmp_path / "w.pth"
    with pytest.raises(DownloadError) as err:
        dl.download(server.url(), dest, progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"cannot download {server.url()}: offline (VMZ_JAX_OFFLINE=1)")
    assert "checkpoint=PATH" in msg and "vmz-jax port PATH DIR" in msg
    assert server.gets == []
    assert_clean(dest)
    # A file already there needs no network.
    dest.write_bytes(b"abc")
    assert dl.download(server.url(), dest, sha256=sha(b"abc"), progress=False) == dest


def test_dns_failure_says_how_to_proceed_offline(tmp_path, monkeypatch):
    calls = []

    def no_dns(*args, **kwargs):
        calls.append(args)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    url = "https://weights.invalid/r2plus1d_34.pth"
    dest = tmp_path / "w.pth"
    with pytest.raises(DownloadError) as err:
        dl.download(url, dest, retries=3, progress=False)
    msg = str(err.value)
    assert msg.startswith(f"cannot download {url}: network unreachable")
    assert "checkpoint=PATH" in msg and "vmz-jax port PATH DIR" in msg and "\n" not in msg
    assert len(calls) == 1  # no point retrying without a network
    assert_clean(dest)


# ---- progress, cache dir, lock ------------------------------------------------------------------


def test_progress_bar_when_forced(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(dl.PROGRESS_ENV, "1")
    data = make_payload(2_500_000, seed=12)
    server.configure(payload=data)
    dl.download(server.url(), tmp_path / "w.pth", progress=True)
    err = capsys.readouterr().err
    assert "w.pth:" in err and "2.5/2.5 MB" in err and "100.0%" in err and "MB/s" in err
    assert err.endswith("\n")


def test_no_progress_bar_when_stderr_is_not_a_tty(server, tmp_path, capsys):
    server.configure(payload=make_payload(1000))
    dl.download(server.url(), tmp_path / "w.pth", progress=True)
    dl.download(server.url(), tmp_path / "v.pth", progress=False)
    assert capsys.readouterr().err == ""


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(dl.HOME_ENV, str(tmp_path / "vh"))
    assert dl.cache_dir() == tmp_path / "vh"
    monkeypatch.delenv(dl.HOME_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dl.cache_dir() == tmp_path / ".cache" / "vmz_jax"


def test_file_lock_excludes_and_times_out(tmp_path):
    target = tmp_path / "w.pth"
    with dl.file_lock(target) as lock:
        assert lock == tmp_path / "w.pth.lock" and lock.exists()
        with pytest.raises(TimeoutError):  # a second open file description conflicts
            with dl.file_lock(target, timeout=0.1):
                pass
    with dl.file_lock(target, timeout=0.1):
        pass


def test_file_lock_waits_for_the_holder(tmp_path):
    target = tmp_path / "w.pth"
    waited, order = threading.Event(), []

    def holder(acquired: threading.Event) -> None:
        with dl.file_lock(target):
            acquired.set()
            time.sleep(0.3)
            order.append("holder done")

    acquired = threading.Event()
    t = threading.Thread(target=holder, args=(acquired,))
    t.start()
    assert acquired.wait(5)
    with dl.file_lock(target, on_wait=waited.set):
        order.append("waiter in")
    t.join(5)
    assert waited.is_set() and order == ["holder done", "waiter in"]


def _worker(url: str, dest: str, sha256: str, ready, go, out) -> None:  # runs in a child
    ready.set()
    go.wait(30)
    t0 = time.monotonic()
    path = dl.download(url, Path(dest), sha256=sha256, progress=False)
    out.put((os.getpid(), str(path), t0, time.monotonic()))


def test_two_processes_download_the_same_file_once(server, tmp_path):
    data = make_payload(1_000_000, seed=13)
    server.configure(payload=data, chunk_delay_s=0.08)  # ~1.3 s: the second must wait
    dest = tmp_path / "shared" / "w.pth"
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in range(2)]
    procs = [
        ctx.Process(target=_worker, args=(server.url(), str(dest), sha(data), r, go, out))
        for r in readies
    ]
    for p in procs:
        p.start()
    try:
        assert all(r.wait(60) for r in readies)
        go.set()
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    results = [out.get(timeout=5) for _ in procs]
    assert {r[1] for r in results} == {str(dest)}
    first_end = min(r[3] for r in results)
    assert all(r[2] < first_end for r in results)  # the two calls overlapped
    assert dest.read_bytes() == data
    assert len(server.gets) == 1  # the second process found the file done
    assert not dl.part_path(dest).exists()
