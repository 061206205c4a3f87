"""ServerProcess: the service as a child process on a free loopback port (tests and benchmarks use it)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import httpx

__all__ = ["ServerProcess", "free_port"]

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``python -m server`` on 127.0.0.1 with its own data directory; output goes to ``log_path``.

    Only loopback addresses are used. :meth:`start` waits until /readyz answers 200.
    """

    def __init__(self, data_dir: str | Path, *, api_key: str | None = None, args: Sequence[str] = (),
                 log_path: str | Path | None = None, env: dict[str, str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.api_key = api_key
        self.args = list(args)
        self.log_path = Path(log_path) if log_path else self.data_dir.parent / f"{self.data_dir.name}.server.log"
        self.env = env
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"api-key": self.api_key} if self.api_key else {}

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        """Start and wait for readiness; RuntimeError (with the log's tail) if it exits or times out."""
        last = ""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):  # the chosen port can be taken between choosing and binding
            self.port = free_port()
            cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--data-dir", str(self.data_dir), "--log-level", "warning", *self.args]
            if self.api_key:
                cmd += ["--api-key", self.api_key]
            env = {**os.environ, **(self.env or {})}
            t0 = time.perf_counter()
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                             cwd=str(Path(__file__).resolve().parent.parent))
            deadline = t0 + timeout
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    r = httpx.get(f"{self.url}/readyz", timeout=1.0)
                    if r.status_code == 200:
                        self.startup_s = time.perf_counter() - t0
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
            last = self.tail()
            if self.proc.poll() is None:
                self.kill()
                raise RuntimeError(f"server not ready after {timeout} s; log tail:\n{last}")
            if "address already in use" not in last.lower():
                break
        raise RuntimeError(f"server exited with code {self.proc.returncode if self.proc else None}; log tail:\n{last}")

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL (no shutdown code runs) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful) and reap; SIGKILL after ``timeout``. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
