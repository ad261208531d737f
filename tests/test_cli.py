"""The `mhmoe` command: sizes table and a layer benchmark that checks before it times."""

import json

import pytest

from mhmoe.cli import main


def test_sizes_prints_every_preset(capsys):
    assert main(["sizes"]) == 0
    out = capsys.readouterr().out
    assert "v2-mhmoe-h3" in out and "| 96 | 3 | 512 |" in out


def test_bench_layer_checks_and_writes_json(tmp_path, capsys):
    path = tmp_path / "sub" / "bench.json"
    assert main(["bench", "layer", "--shapes", "tiny", "--repeats", "1", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    (bench,) = report["benchmarks"]
    impls = {r["impl"]: r for r in bench["results"]}
    assert {"loop", "slices", "grouped_mm", "dense-eq"} <= set(impls)
    assert impls["grouped_mm"]["max_rel_error"] < 1e-4 and impls["dense-eq"]["vs_dense"] == 1.0
    assert report["environment"]["torch"] and "| tiny | grouped_mm |" in capsys.readouterr().out


def test_bench_rejects_unknown_shape_and_bad_repeats():
    with pytest.raises(SystemExit, match="unknown shape"):
        main(["bench", "layer", "--shapes", "nope"])
    with pytest.raises(SystemExit, match="--repeats must be >= 1"):
        main(["bench", "layer", "--repeats", "0"])
