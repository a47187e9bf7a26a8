"""`pml encode`, `pml store`, `pml run`: output shapes and exit codes, on a tiny random model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pml_cli.main import main

def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_encode_json_reports_bytes_per_token(files, capsys):
    store = str(files / "store")
    out = run_json(capsys, "encode", str(files / "s.pml"), "--model", "tiny:llama", "--store", store, "--json")
    assert {"modules", "tokens", "bytes", "bytes_per_token", "seconds"} <= set(out)
    assert out["modules"] == 3 and out["tokens"] > 0 and out["encoded"] == 3
    assert abs(out["bytes_per_token"] / out["expected_bytes_per_token"] - 1) < 0.02
    again = run_json(capsys, "encode", str(files / "s.pml"), "--model", "tiny:llama", "--store", store, "--json")
    assert again["encoded"] == 0 and again["bytes"] == out["bytes"]
    half = run_json(capsys, "encode", str(files / "s.pml"), "--model", "tiny:llama", "--store", store,
                    "--dtype", "fp16", "--json")
    assert half["bytes_per_token"] * 2 == out["bytes_per_token"]


def test_run_json_shape_and_no_cache_baseline(files, capsys):
    common = [str(files / "p.pml"), "--schema", str(files / "s.pml"), "--model", "tiny:llama",
              "--store", str(files / "store"), "--max-new-tokens", "4", "--json"]
    cached = run_json(capsys, "run", *common)
    assert set(cached) >= {"text", "usage", "timing"}
    assert set(cached["usage"]) == {"prompt_tokens", "cached_tokens", "completion_tokens", "recomputed_tokens"}
    assert {"ttft_ms", "cache_ms", "prefill_ms", "decode_tokens_per_s"} <= set(cached["timing"])
    assert cached["usage"]["cached_tokens"] > 0
    base = run_json(capsys, "run", *common, "--no-cache")
    assert base["usage"]["cached_tokens"] == 0
    assert base["usage"]["prompt_tokens"] == cached["usage"]["prompt_tokens"]


def test_store_ls_verify_rm(files, capsys):
    store = str(files / "store")
    assert main(["encode", str(files / "s.pml"), "--model", "tiny:llama", "--store", store]) == 0
    capsys.readouterr()
    rows = run_json(capsys, "store", "ls", "--store", store, "--json")
    assert {r["module"] for r in rows} == {"", "a", "b"}
    assert all(r["schema"] == "notes" and r["tier"] == "disk" and r["tokens"] > 0 for r in rows)
    assert main(["store", "verify", "--store", store]) == 0
    assert "3 entries checked, 0 corrupted" in capsys.readouterr().out
    victim = next(Path(store).rglob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-7])  # truncated
    assert main(["store", "verify", "--store", store]) == 1
    assert "1 corrupted" in capsys.readouterr().out
    assert main(["store", "rm", "--all", "--store", store]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert run_json(capsys, "store", "ls", "--store", store, "--json") == []


def test_bad_input_is_one_line_and_exit_2(files, capsys):
    assert main(["encode", str(files / "s.pml"), "--model", "no-such-model", "--store", str(files / "st")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "smollm2-135m" in err and "Traceback" not in err
    assert main(["encode", str(files / "s.pml"), "--model", "tiny:nope", "--store", str(files / "st")]) == 2
    err = capsys.readouterr().err
    assert "unknown tiny model 'tiny:nope'" in err and "tiny:llama" in err and "Traceback" not in err
    store = str(files / "store")
    assert main(["encode", str(files / "s.pml"), "--model", "tiny:llama", "--store", store]) == 0
    assert main(["encode", str(files / "s.pml"), "--model", "tiny:qwen2", "--store", store]) == 2
    assert "holds states of model 'tiny-llama-s0'" in capsys.readouterr().err
    (files / "bad.pml").write_text('<prompt schema="notes"><b thing="a value that is far too long for eight"/>Hi</prompt>')
    code = main(["run", str(files / "bad.pml"), "--schema", str(files / "s.pml"), "--model", "tiny:llama",
                 "--store", store])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"{files / 'bad.pml'}:1: error:") and "thing" in err


def test_console_script_runs_as_a_subprocess(files):
    out = subprocess.run([sys.executable, "-m", "pml_cli", "run", str(files / "p.pml"), "--schema",
                          str(files / "s.pml"), "--model", "tiny:gemma3", "--store", str(files / "store"),
                          "--max-new-tokens", "3", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["usage"]["completion_tokens"] <= 3


def test_store_command_errors(files, capsys):
    assert main(["store", "ls", "--store", str(files / "no-such-store")]) == 2
    assert "no store at" in capsys.readouterr().err
    store = str(files / "store")
    assert main(["encode", str(files / "s.pml"), "--model", "tiny:llama", "--store", store]) == 0
    capsys.readouterr()
    assert main(["store", "rm", "--store", store]) == 2  # nothing named: refuse rather than guess
    assert "--all" in capsys.readouterr().err
    (files / "store" / "owner.json").write_text("{not json")
    assert main(["encode", str(files / "s.pml"), "--model", "tiny:llama", "--store", store]) == 2
    assert "unreadable" in capsys.readouterr().err


def test_missing_files_are_one_line_errors(files, capsys):
    store = str(files / "store")
    assert main(["encode", str(files / "nope.pml"), "--model", "tiny:llama", "--store", store]) == 2
    assert capsys.readouterr().err.strip() == f"{files / 'nope.pml'}: error: no such file"
    assert main(["run", str(files / "nope.pml"), "--schema", str(files / "s.pml"), "--model", "tiny:llama",
                 "--store", store]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err


def test_a_model_folder_that_does_not_exist_is_one_line(files, capsys):
    code = main(["encode", str(files / "s.pml"), "--model", str(files / "no-model-here"), "--store", str(files / "st")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("pml: error: cannot load model") and "Traceback" not in err


def test_threads_are_checked_at_parse_time_and_reported(files, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", str(files / "p.pml"), "--schema", str(files / "s.pml"), "--threads", "0"])
    assert e.value.code == 2 and "positive integer" in capsys.readouterr().err
    out = run_json(capsys, "run", str(files / "p.pml"), "--schema", str(files / "s.pml"), "--model", "tiny:llama",
                   "--store", str(files / "store"), "--max-new-tokens", "2", "--threads", "1", "--json")
    assert out["threads"] == 1
    assert out["load_ms"] > 0 and out["timing"]["ttft_ms"] > 0  # model load reported beside TTFT


def test_compare_policies_json(files, capsys):
    # every module in order, scaffolds kept: blend:1 recomputes the whole context with full attention,
    # which is what the schema policy stored (the scaffold's slot leaves a gap, so not the baseline)
    (files / "all.pml").write_text('<prompt schema="notes"><a/><b/>What do the notes say?</prompt>')
    out = run_json(capsys, "compare", str(files / "all.pml"), "--schema", str(files / "s.pml"), "--model", "tiny:llama",
                   "--store", str(files / "store"), "--max-new-tokens", "3", "--policies", "independent,blend:1,link:2,schema",
                   "--json")
    rows = {r["policy"]: r for r in out["policies"]}
    assert list(rows) == ["independent", "blend:1", "link:2", "schema"]
    assert rows["independent"]["recomputed_tokens"] == 0 and rows["blend:1"]["recomputed_%"] == 100.0
    assert abs(rows["blend:1"]["mean_kl"] - rows["schema"]["mean_kl"]) < 1e-4
    assert rows["blend:1"]["text"] == rows["schema"]["text"]
    with pytest.raises(SystemExit):
        main(["compare", str(files / "p.pml"), "--schema", str(files / "s.pml"), "--policies", "blend:7"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", ["encode", "run", "demo"])
def test_device_cuda_without_cuda_is_one_line_exit_2(files, capsys, command):
    argv = {"encode": ["encode", str(files / "s.pml")],
            "run": ["run", str(files / "p.pml"), "--schema", str(files / "s.pml")],
            "demo": ["demo"]}[command]
    assert main([*argv, "--model", "tiny:llama", "--store", str(files / "store"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    # expected: one line that names the device and says CUDA is missing; nothing was stored
    assert err.count("\n") == 1 and "cuda" in err and "not available" in err
    assert not (files / "store").exists()


def test_device_and_device_map_together_is_one_line_exit_2(files, capsys):
    argv = ["encode", str(files / "s.pml"), "--model", "tiny:llama", "--store", str(files / "store"),
            "--device", "cpu", "--device-map", "auto"]
    assert main(argv) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("placement", [["--device", "cpu"], ["--device-map", "auto"]])
def test_run_with_a_placement_answers_as_without(files, capsys, placement):
    common = [str(files / "p.pml"), "--schema", str(files / "s.pml"), "--model", "tiny:llama",
              "--store", str(files / "store"), "--max-new-tokens", "6", "--json"]
    plain = run_json(capsys, "run", *common)
    placed = run_json(capsys, "run", *common, *placement)
    # expected: on a CPU machine both placements are the CPU: the same greedy text, all modules cached
    assert placed["text"] == plain["text"]
    assert placed["usage"] == plain["usage"] and placed["usage"]["cached_tokens"] > 0


def test_run_reports_kernels_and_a_bad_kernel_mode_is_one_line(files, capsys, monkeypatch):
    common = [str(files / "p.pml"), "--schema", str(files / "s.pml"), "--model", "tiny:llama",
              "--store", str(files / "store"), "--max-new-tokens", "2", "--json"]
    out = run_json(capsys, "run", *common)
    assert out["kernels"] == "c" or out["kernels"].startswith("torch (")
    monkeypatch.setenv("PML_KERNELS", "fast")
    assert main(["run", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PML_KERNELS must be one of auto, on, off, not 'fast'" in err[0]
