"""The tqindex command: info, bench forwarding, serve argument checks, and `tqindex serve` as a real process."""

from __future__ import annotations

import importlib.metadata
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.process import free_port
from tqindex import cli

ROOT = Path(__file__).resolve().parent.parent


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tqindex"] and data["torch"] and isinstance(data["cuda_available"], bool)
    assert "triton" in data and "gpus" in data


def test_info_text(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "cuda_available" in out


def test_bench_lists_and_rejects_unknown(capsys):
    assert cli.main(["bench"]) == 0
    assert "benchmarks available here" in capsys.readouterr().out
    assert cli.main(["bench", "no-such-bench"]) == 2
    assert "not available" in capsys.readouterr().err


def test_bench_forwards_arguments():
    # bench.crash is ours and always present: --help proves the forwarding without running it.
    out = subprocess.run([sys.executable, "-m", "tqindex.cli", "bench", "crash", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--cycles" in out.stdout


def _installed_command() -> Path:
    """The `tqindex` console script of this environment (what `make install` puts in .venv/bin)."""
    try:
        importlib.metadata.distribution("tqindex")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tqindex is not pip-installed in this environment (run `make install`)")
    exe = Path(sys.executable).parent / "tqindex"
    assert exe.is_file(), f"tqindex is installed but its console script {exe} is missing"
    return exe


@pytest.mark.parametrize("where", ["root", "subdir", "elsewhere"])
def test_installed_command_runs_benchmarks(where, tmp_path):
    # The console script's sys.path[0] is its bin/ directory, not the checkout: it must still find bench/.
    exe = _installed_command()
    cwd = {"root": ROOT, "subdir": ROOT / "tests", "elsewhere": tmp_path}[where]
    listing = subprocess.run([str(exe), "bench"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "crash" in listing.stdout and "recall" in listing.stdout and "none" not in listing.stdout
    out = subprocess.run([str(exe), "bench", "crash", "--help"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--cycles" in out.stdout, out.stderr


@pytest.mark.parametrize("args", [["--max-k", "0"], ["--port", "70000"], ["--snapshot-wal-bytes", "-1"]])
def test_serve_rejects_bad_limits(args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", *args])
    assert e.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_serve_process(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "tqindex.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(tmp_path / "data"), "--api-key", "k1", "--log-level", "warning"]
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/collections").status_code == 401
        r = httpx.put(f"{url}/collections/c", headers={"api-key": "k1"},
                      json={"vectors": {"size": 4, "distance": "Dot"}})
        assert r.status_code == 200, r.text
        assert (tmp_path / "data" / "collections" / "c" / "config.json").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        log.close()
    assert code in (0, -signal.SIGTERM)
