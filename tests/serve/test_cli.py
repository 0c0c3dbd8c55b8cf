"""`interplab serve` as a user runs it: prints the URLs, answers, stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
REPO = Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("INTERPLAB_API_KEY", None)
    return env


@pytest.mark.slow
def test_public_bind_without_key_is_refused_before_loading():
    result = subprocess.run([sys.executable, "-m", "interplab.cli", "serve", "no-such-model", "--host", "0.0.0.0"],
                            capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 2
    assert "--api-key" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_serve_prints_urls_answers_and_stops_on_ctrl_c(shared_dir):
    model = shared_dir / "models" / "TinyStories-656K"
    process = subprocess.Popen([sys.executable, "-m", "interplab.cli", "serve", str(model), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            lines.append(line)
            if line.startswith("OpenAI-compatible API:"):
                break
        assert lines[0].startswith("interplab workbench: http://127.0.0.1:")
        api = lines[-1].split()[2]
        models = httpx.get(api + "/models", timeout=30).json()
        assert models["data"][0]["id"] == str(model)
        reply = httpx.post(api + "/completions", json={"prompt": "Once", "max_tokens": 3, "temperature": 0}, timeout=60)
        assert reply.status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_unreadable_transcoders_folder_is_one_line_and_exit_2(shared_dir, tmp_path):
    model = shared_dir / "models" / "TinyStories-656K"
    result = subprocess.run([sys.executable, "-m", "interplab.cli", "serve", str(model), "--port", "0",
                             "--transcoders", str(tmp_path / "missing")], capture_output=True, text=True, env=_env(),
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "transcoders.json" in result.stderr and "Traceback" not in result.stderr
