"""`pml serve` as a subprocess: it serves the OpenAI API on a free port; bad arguments are one line and exit 2."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pml_cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_then_stops(tmp_path):
    (tmp_path / "s.pml").write_text('<schema name="s">Root. <module name="m">Module text.</module></schema>')
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pml_cli", "serve", "--model", "tiny:llama", "--port", str(port),
                             "--store", str(tmp_path / "store"), "--schema", str(tmp_path / "s.pml"),
                             "--api-key", "k", "--min-prefix", "0", "--block-size", "4", "--granularity", "4"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        h = {"Authorization": "Bearer k"}
        assert [s["name"] for s in httpx.get(url + "/v1/schemas", headers=h).json()["data"]] == ["s"]
        body = {"model": "tiny:llama", "messages": [], "max_tokens": 2, "temperature": 0,
                "pml": '<prompt schema="s"><m/><user>Question?</user></prompt>'}
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=h, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # The disk tier got the schema's module states.
    assert list((tmp_path / "store").glob("??/*.safetensors"))


def test_missing_schema_file_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.pml"
    assert main(["serve", "--model", "tiny:llama", "--schema", str(missing)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"pml: error: no such schema file: {missing}"]


def test_bad_cache_settings_are_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:  # the parser refuses it, before the model loads
        main(["serve", "--model", "tiny:llama", "--block-size", "0", "--store", "unused"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "pml: error: argument --block-size: expected a whole number >= 1, got '0'")


@pytest.mark.parametrize("model", ["no-such-model", "tiny:nope"])
def test_unknown_model_is_one_line_and_exit_2(model, tmp_path, capsys):
    assert main(["serve", "--model", model, "--port", "0", "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pml: error: unknown") and f"'{model}'" in err[0]


def test_busy_port_is_one_line_and_exit_2(capsys):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["serve", "--model", "tiny:llama", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pml: error: cannot listen on 127.0.0.1:{port}")


def test_malformed_schema_file_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.pml"
    bad.write_text("<schema name='x'>\n<module>")
    assert main(["serve", "--model", "tiny:llama", "--port", "0", "--store", str(tmp_path / "store"),
                 "--schema", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pml: error: 2: error: malformed XML")


@pytest.mark.parametrize("flag, value, message", [
    ("--semantic-cache", "2", "cosine similarity in (0, 1]"),
    ("--semantic-cache", "high", "cosine similarity in (0, 1]"),
    ("--threads", "0", "positive integer"),
    ("--max-batch", "0", "a whole number >= 1"),
    ("--max-batch", "many", "a whole number >= 1"),
])
def test_bad_semantic_threshold_or_threads_fail_at_parse_time(capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "tiny:llama", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err


def test_bad_kernel_mode_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setenv("PML_KERNELS", "fast")
    assert main(["serve", "--model", "tiny:llama", "--port", "0", "--store", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == "pml: error: PML_KERNELS must be one of auto, on, off, not 'fast'"
