"""mhmoe.train.allocator: the CLI's glibc malloc settings, and when they are left alone."""

import platform

import pytest

from mhmoe.train import allocator
from mhmoe.train.allocator import tune_cpu_allocator

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not glibc, reason="mallopt is glibc's")
def test_tunes_glibc_and_records_it(monkeypatch):
    for name in ("MHMOE_TUNE_MALLOC", "GLIBC_TUNABLES", *allocator._GLIBC_ENV):
        monkeypatch.delenv(name, raising=False)
    result = tune_cpu_allocator()
    assert result == dict(tuned=True, mmap_max=0, trim_threshold=1 << 30)
    assert allocator.state == result


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"MHMOE_TUNE_MALLOC": "0"}, "MHMOE_TUNE_MALLOC=0"),
        ({"MALLOC_TRIM_THRESHOLD_": "1000"}, "MALLOC_TRIM_THRESHOLD_ set"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000"}, "GLIBC_TUNABLES set"),
    ],
)
def test_leaves_explicit_settings_alone(monkeypatch, env, reason):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = tune_cpu_allocator()
    assert result["tuned"] is False and reason in result["reason"]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1G"])
def test_rejects_a_bad_threshold(bad):
    with pytest.raises(ValueError, match="trim_threshold"):
        tune_cpu_allocator(bad)
