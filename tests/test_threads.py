"""mhmoe.train.threads: the command line makes idle OpenMP threads sleep, before torch loads, unless told otherwise."""

import os
import subprocess
import sys

import pytest

from mhmoe.train import threads
from mhmoe.train.threads import openmp_defaults, set_openmp_defaults


def test_the_default_is_the_passive_wait_policy():
    assert openmp_defaults({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_defaults({"OMP_NUM_THREADS": "4", "PATH": "/bin"}) == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize(
    "env",
    [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}, {"KMP_BLOCKTIME": "200"}, {"MHMOE_OMP_PASSIVE": "0"}],
)
def test_a_users_own_wait_setting_is_kept(env, monkeypatch):
    monkeypatch.setattr(threads, "state", threads.state)  # put back afterwards
    assert openmp_defaults(env) == {}
    environ = dict(env)
    state = set_openmp_defaults(environ, modules={})
    assert environ == env and state["set"] is False and next(iter(env)) in state["reason"]


def test_sets_the_environment_only_while_torch_is_not_loaded(monkeypatch):
    monkeypatch.setattr(threads, "state", threads.state)
    environ: dict[str, str] = {"PATH": "/bin"}
    assert set_openmp_defaults(environ, modules={}) == dict(set=True, environment={"OMP_WAIT_POLICY": "PASSIVE"})
    assert environ == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"} and threads.state is not None
    environ = {"PATH": "/bin"}
    state = set_openmp_defaults(environ, modules={"torch": object()})  # too late: its OpenMP has read the environment
    assert environ == {"PATH": "/bin"} and state["set"] is False and "torch was imported" in state["reason"]


def test_the_command_line_sets_it_before_anything_loads_torch():
    """`import mhmoe` and the CLI's module load no torch, so `main` is in time; its children inherit the setting."""
    code = (
        "import os, sys, mhmoe, mhmoe.cli\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n    mhmoe.cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
        "from mhmoe.train import threads\n"
        "print(threads.state, os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (*threads.WAIT_SETTINGS, "MHMOE_OMP_PASSIVE")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines()[-1] == "{'set': True, 'environment': {'OMP_WAIT_POLICY': 'PASSIVE'}} PASSIVE False"


def test_every_public_name_loads_on_first_use():
    import mhmoe

    assert set(mhmoe._SOURCES) == set(mhmoe.__all__) - {"__version__"}
    for name in mhmoe.__all__:
        assert getattr(mhmoe, name) is not None and name in dir(mhmoe)
    with pytest.raises(AttributeError, match="no attribute 'MHMOE'"):
        mhmoe.MHMOE  # noqa: B018
