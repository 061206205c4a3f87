"""The README's REST examples (its qdrant-client snippet and its curl block) run against a real server."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from server.process import ServerProcess

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## REST service: Qdrant's API"


def _blocks(lang: str) -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(rf"```{lang}\n(.*?)```", text[start : end if end != -1 else None], re.S)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("readme") / "data") as s:
        yield s


def test_python_snippet(srv):
    pytest.importorskip("qdrant_client")
    (code,) = _blocks("python")
    expected = re.search(r"print\(.*\)\s*#\s*(.*)", code).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code.replace("localhost:6333", f"127.0.0.1:{srv.port}"), "README.md", "exec"), {})
    assert out.getvalue().strip() == expected


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_block(srv):
    (script,) = _blocks("bash")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script.replace("localhost:6333", f"127.0.0.1:{srv.port}")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    answers = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    commands = [ln for ln in script.splitlines() if ln.startswith("q ")]
    assert len(answers) == len(commands), run.stdout
    assert all(a["status"] == "ok" for a in answers), run.stdout
    res = [a["result"] for a in answers]
    assert res[0] == "alive" and res[1] is True and res[2]["status"] == "completed"
    assert [h["id"] for h in res[3]["points"]] == [1, 3]  # the red points, nearest first
    assert [p["id"] for p in res[4]] == [1, "5c56c793-69f3-4fbf-87e6-c4bf54c28c26"]
    assert res[5]["next_page_offset"] == "5c56c793-69f3-4fbf-87e6-c4bf54c28c26"  # integers first, then UUIDs
    assert res[6] == {"count": 1}
    assert res[10]["points_count"] == 2 and res[10]["config"]["params"]["vectors"]["distance"] == "Cosine"
    assert res[-1] is True
