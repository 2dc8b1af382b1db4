"""A rewriter server that ASD starts and stops itself (`asd.server.launch`).

Without `launch`, the `openai` backend talks to whatever answers at `asd.server.base_url`, as
a user started it. With it, the first ASD task that needs the rewriter runs the configured
command (e.g. `vllm serve OpenGVLab/InternVL2-26B --trust-remote-code --port {port}`, from its
own environment), waits until `/health` answers (and `/v1/models`, where it lists models, lists the configured one),
and the same server then serves every task of the run; `stop_servers` (called when the ASD part
of a flow ends, on Ctrl-C by `sefe run`, and at interpreter exit) stops it. A server already
answering at `base_url` is used as it is and never stopped by us.

The process runs in its own session (a terminal's Ctrl-C does not reach it half-way through a
write) and its output goes to a log file whose tail is in every start-up error.
"""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from sefe_core.rewriter import LaunchConfig, RewriterError

log = logging.getLogger(__name__)
LOG_TAIL_CHARS = 3000


class ServerStartError(RewriterError):
    """The launched server exited, or did not become ready in time; the message has its log tail."""


def root_url(base_url: str) -> str:
    """`http://h:p/v1` -> `http://h:p`: vLLM and `transformers serve` answer /health there."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def served_models(base_url: str, timeout_s: float = 2.0) -> list[str] | None:
    """The model ids a server at `base_url` lists, or None when it lists none (down, or an error)."""
    try:
        r = httpx.get(base_url.rstrip("/") + "/models", timeout=timeout_s)
        if r.status_code != 200:
            return None
        return [m.get("id", "") for m in r.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def server_up(base_url: str) -> bool:
    """Something answers /health (vLLM, `transformers serve`) or lists models at `base_url`."""
    return _ok(root_url(base_url) + "/health") or served_models(base_url) is not None


class ManagedServer:
    """One server process: `start` waits until it is ready, `stop` ends it (and its children)."""

    def __init__(
        self,
        argv: list[str],
        base_url: str,
        model: str | None,
        log_path: Path,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 900.0,
    ) -> None:
        self.argv, self.base_url, self.model = argv, base_url.rstrip("/"), model
        self.log_path, self.env, self.startup_timeout_s = Path(log_path), env or {}, startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _fail(self, why: str) -> ServerStartError:
        self.stop()
        return ServerStartError(
            f"the rewriter server ({shlex.join(self.argv)}) {why}. Its log ({self.log_path}) ends:\n"
            f"{self.log_tail() or '(empty)'}"
        )

    def start(self, say: Callable[[str], None] = log.info, poll_s: float = 0.5) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        say(f"starting the rewriter server: {shlex.join(self.argv)} (log: {self.log_path})")
        t0 = time.monotonic()
        with open(self.log_path, "ab") as out:
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **self.env},
                    start_new_session=True,
                )
            except OSError as e:
                raise ServerStartError(f"the rewriter server command cannot run: {e}") from e
        health, next_note = root_url(self.base_url) + "/health", t0 + 30
        while True:
            if self.proc.poll() is not None:
                raise self._fail(f"exited with code {self.proc.returncode} before it was ready")
            elapsed = time.monotonic() - t0
            if elapsed > self.startup_timeout_s:
                raise self._fail(
                    f"did not answer {health} within "
                    f"asd.server.launch.startup_timeout_s={self.startup_timeout_s:g} s"
                )
            if _ok(health):
                # vLLM lists its models; `transformers serve` offline answers /models with an error
                models = served_models(self.base_url)
                if models is None or self.model is None or self.model in models:
                    say(f"rewriter server ready after {elapsed:.0f} s at {self.base_url} (models: {models})")
                    return
                raise self._fail(
                    f"serves {models}, not asd.server.model={self.model!r} (set --served-model-name "
                    "to it, or asd.server.model to one of those)"
                )
            if time.monotonic() >= next_note:
                last = self.log_tail(400).strip().splitlines()[-1:] or ["(no output yet)"]
                say(f"waiting for the rewriter server ({elapsed:.0f} s): {last[0][:200]}")
                next_note += 30
            time.sleep(poll_s)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the server's process group (vLLM forks an engine process), SIGKILL after
        `grace_s`."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children that outlived the leader
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------------------------
# The servers this process started: one per base_url, shared by every ASD task of a run
# --------------------------------------------------------------------------------------------
_started: dict[str, ManagedServer] = {}
_lock = threading.Lock()


def ensure_server(
    base_url: str,
    model: str | None,
    launch: LaunchConfig | None,
    default_log: Path,
    say: Callable[[str], None] = log.info,
) -> ManagedServer | None:
    """Make sure a rewriter server answers at `base_url`: the one we started earlier, one that was
    already running (used as it is), or a new one from `launch`. Returns the server we manage, or
    None when it is not ours (or `launch` is not set: the rewriter then reports an absent server)."""
    if launch is None:
        return None
    with _lock:
        mine = _started.get(base_url)
        if mine is not None and mine.running():
            return mine
        if server_up(base_url):
            say(f"a server already answers at {base_url}: using it (asd.server.launch not needed)")
            return None
        log_path = Path(launch.log_file) if launch.log_file else default_log
        server = ManagedServer(
            launch.argv(base_url), base_url, model, log_path, launch.env, launch.startup_timeout_s
        )
        _started[base_url] = server  # before it starts: a Ctrl-C during the wait must find it
    try:
        server.start(say)
    except BaseException:
        server.stop()
        with _lock:
            _started.pop(base_url, None)
        raise
    return server


def stop_servers(say: Callable[[str], None] = log.info) -> int:
    """Stop every server this process started; returns how many were running."""
    with _lock:
        servers = list(_started.values())
        _started.clear()
    n = 0
    for s in servers:
        if s.running():
            say(f"stopping the rewriter server at {s.base_url}")
            s.stop()
            n += 1
    return n


atexit.register(stop_servers)
