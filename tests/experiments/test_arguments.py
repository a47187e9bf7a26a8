"""Every numeric option of `pml` and `pml bench` rejects a bad value in the parser, and the
experiments' `--threads` resolves as documented (`experiments.cli.add_threads_argument`)."""

from __future__ import annotations

import argparse

import pytest

from experiments import cli
from prompt_cache import threads

TYPES = {cli.count: ("-1", "x"), cli.positive: ("0", "x"), cli.port: ("-1", "65536"), cli.thread_count: ("0", "x"),
         cli.similarity: ("0", "1.5", "high")}
LISTS = (",", "1,x", "1,-2")  # bad values of every comma-separated list of numbers (`cli.listed`)


def _bad_values(kind) -> tuple[str, ...]:
    return LISTS if getattr(kind, "__name__", "").startswith("list of") else TYPES.get(kind, ())


def _subs(parser) -> dict:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _commands():
    """(command line prefix, parser) of every sub-command of `pml` and of `pml bench` (whose
    arguments `pml` hands to `experiments.cli`'s parser)."""
    from pml_cli.main import build_parser

    for name, p in _subs(build_parser()).items():
        if name != "bench":
            yield (name,), p
    for name, p in _subs(cli.build_parser(prog="pml bench")).items():
        yield ("bench", name), p


def _numeric_options():
    for prefix, p in _commands():
        for action in p._actions:
            if action.type in (int, float) or _bad_values(action.type):
                yield prefix, action


def test_every_numeric_option_is_validated():
    # a bare int would take -1 (or 0 repeats, 0 tokens) and fail later with a traceback, or not at all
    bare = [f"{' '.join(prefix)} {action.option_strings[0]}" for prefix, action in _numeric_options()
            if action.type in (int, float)]
    assert bare == []
    assert sum(1 for _ in _numeric_options()) > 50  # the walk found the options (every experiment's included)


def test_lists_of_numbers_parse_to_lists():
    args = cli.build_parser().parse_args(["latency", "--lengths", "100, 200,", "--modules", "3"])
    assert args.lengths == [100, 200] and args.modules == [3]
    assert cli.build_parser().parse_args(["semantic"]).thresholds[:2] == [0.80, 0.85]  # the default, parsed too


@pytest.mark.parametrize("prefix, action", [pytest.param(p, a, id=f"{' '.join(p)} {a.option_strings[0]}")
                                            for p, a in _numeric_options()])
def test_a_bad_number_is_a_one_line_parser_error(prefix, action, capsys):
    from pml_cli.main import main

    option = action.option_strings[0]
    for bad in _bad_values(action.type):
        with pytest.raises(SystemExit) as e:  # `pml` parses before it loads anything
            main([*prefix, option, bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert option in err and bad in err and "Traceback" not in err


def _threads_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_threads_argument(p)
    return p.parse_args(list(argv))


def test_bench_threads_default_environment_and_policy(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    assert cli.bench_threads(_threads_args()) == cli.BENCH_THREADS  # the benchmarks pin one count
    assert cli.bench_threads(_threads_args("--threads", "3")) == 3
    assert cli.bench_threads(_threads_args("--threads", "0")) == 0  # left to the policy (a server's own)
    monkeypatch.setenv(threads.ENV, "2")
    assert cli.bench_threads(_threads_args()) == 2  # $PML_THREADS, as for `pml run`
    assert cli.bench_threads(_threads_args("--threads", "3")) == 3  # the flag wins
    monkeypatch.setenv(threads.ENV, "none")
    with pytest.raises(SystemExit, match="PML_THREADS.*positive integer"):
        cli.bench_threads(_threads_args())


def test_apply_threads_states_the_count_used(machine):
    import torch

    machine(cores=4, load=1.3)
    args = _threads_args("--threads", "0")
    assert cli.apply_threads(args) == 3 == args.threads == torch.get_num_threads()  # 4 cores, 1 busy
    args = _threads_args()
    assert cli.apply_threads(args) == 1 == args.threads == torch.get_num_threads()


def test_quality_defaults_to_the_policy(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    args = cli.build_parser().parse_args(["quality"])
    assert args.threads is None and cli.bench_threads(args) == 0  # free cores by the load average
    args = cli.build_parser().parse_args(["speed"])
    assert cli.bench_threads(args) == 1


@pytest.mark.parametrize("name", ["batch", "speed"])
@pytest.mark.parametrize("model, says", [("no-such-model", "smollm2-135m"), ("tiny:nope", "tiny:llama")])
def test_an_unknown_model_is_a_one_line_error(name, model, says, capsys, tmp_path):
    from pml_cli.main import main

    assert main(["bench", name, "--model", model, "--out", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"model '{model}'" in err and says in err


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy, the module imported already
@pytest.mark.parametrize("name", list(cli.EXPERIMENTS))
def test_python_dash_m_runs_each_experiment(name, monkeypatch, capsys):
    # `python -m experiments.NAME` is the rerun command the docs give: it must reach the same parser
    # as `pml bench NAME` (a module without a __main__ block ran nothing and exited 0)
    import runpy

    monkeypatch.setattr("sys.argv", [f"experiments/{name}.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module(f"experiments.{name}", run_name="__main__", alter_sys=False)
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m experiments {name}")
