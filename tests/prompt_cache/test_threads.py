"""The thread policy: a default from free cores, an environment override, and checked input."""

import pytest
import torch

from prompt_cache import threads


def test_default_leaves_busy_cores_alone(machine, monkeypatch):
    machine(cores=4, load=1.7)
    assert threads.default_threads() == 3  # one core busy
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert threads.default_threads() == 1  # never zero


def test_a_reserve_leaves_cores_to_other_work_but_never_zero_threads(machine, monkeypatch):
    machine(cores=4, load=0.3)
    assert threads.default_threads(reserve=1) == 3
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.7, 0.0, 0.0))
    assert threads.default_threads(reserve=1) == 2
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.2, 0.0, 0.0))
    assert threads.default_threads(reserve=1) == 1
    monkeypatch.setenv(threads.ENV, "4")
    assert threads.default_threads(reserve=1) == 4  # what the user set wins


def test_the_server_model_thread_leaves_a_core_to_the_front_end(machine):
    from serving import worker

    machine(cores=2, load=0.0)
    worker._set_threads(None)
    assert torch.get_num_threads() == 2 - threads.SERVER_FRONT_END_CORES == 1
    worker._set_threads(2)  # --threads 2
    assert torch.get_num_threads() == 2


def test_environment_overrides_and_bad_values_are_errors(monkeypatch):
    monkeypatch.setenv(threads.ENV, "2")
    assert threads.default_threads() == 2
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match="positive integer"):
            threads.parse_threads(bad)


def test_apply_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.apply_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_wait_policy_spins_only_when_short_lived_on_an_idle_machine(monkeypatch):
    for name in threads.WAIT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.4, 0.0, 0.0))
    assert threads.wait_policy(long_running=False) == {}  # libgomp's default: spin a while, then sleep
    assert threads.wait_policy(long_running=True) == {"OMP_WAIT_POLICY": "PASSIVE"}  # pml serve
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert threads.wait_policy(long_running=False) == {"OMP_WAIT_POLICY": "PASSIVE"}  # a core is busy now


@pytest.mark.parametrize("name,value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "1000")])
def test_wait_policy_leaves_what_the_user_set(monkeypatch, name, value):
    for other in threads.WAIT_ENV:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, value)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (5.0, 0.0, 0.0))
    assert threads.wait_policy(long_running=True) == {}


def test_the_pml_command_sets_the_wait_policy_before_torch_loads():
    """A fresh `pml serve` process gets PASSIVE, decided before anything has imported torch."""
    import os
    import subprocess
    import sys

    probe = ("import sys; sys.argv = ['pml', 'serve']\n"
             "import prompt_cache.threads as t\n"
             "decide = t.wait_policy\n"
             "t.wait_policy = lambda **kw: print('torch' in sys.modules) or decide(**kw)\n"
             "import os, pml_cli.main\n"
             "print(os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_ENV}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "PASSIVE"]


def test_python_m_experiments_sets_the_wait_policy_before_torch_loads():
    """`python -m experiments.X` decides the wait policy as `pml bench X` does, before torch loads."""
    import os
    import subprocess
    import sys

    probe = ("import sys\n"
             "import prompt_cache.threads as t\n"
             "decide = t.wait_policy\n"
             "t.wait_policy = lambda **kw: print('called', 'torch' in sys.modules) or decide(**kw)\n"
             "from experiments.cli import main\n"
             "main(['batch', '--help'])\n")
    env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_ENV}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "called False"


def test_set_wait_policy_changes_nothing_once_torch_is_loaded(monkeypatch):
    for name in threads.WAIT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.0, 0.0, 0.0))  # would choose PASSIVE
    assert "torch" in __import__("sys").modules  # imported at the top of this file
    assert threads.set_wait_policy(long_running=True) == {}
    assert not any(name in threads.os.environ for name in threads.WAIT_ENV)
