"""lightflax.tables: rows over seeds with mean ± std, from results.json files."""

import json
import statistics

import pytest

from lightflax import tables


def _write(path, **kw):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(kw))


def test_groups_seeds_and_replicas(tmp_path):
    _write(tmp_path / "conv2d_s0", total_params=10, test_accuracy=0.90, test_loss=0.3,
           select_metrics={"accuracy": 0.8, "accuracy_std": 0.0})
    _write(tmp_path / "conv2d_s1", total_params=10, test_accuracy=0.92, test_loss=0.2,
           select_metrics={"accuracy": 0.9})
    _write(tmp_path / "light_k2", total_params=5, test_accuracy=0.5, config={"select_split": "val"},
           replicas=[{"seed": 0, "test": {"accuracy": 0.6, "loss": 1.0}, "val": {"accuracy": 0.7}},
                     {"seed": 1, "test": {"accuracy": 0.8, "loss": 2.0}, "val": {"accuracy": 0.75}}])
    (tmp_path / "unfinished_s0").mkdir()
    rows = tables.collect(str(tmp_path))
    assert list(rows) == ["conv2d", "light_k2"]
    entries = tables.table(rows, ["test_accuracy", "select.accuracy"])
    conv, light = entries
    assert conv["seeds"] == 2 and conv["total_params"] == 10
    assert conv["test_accuracy"]["mean"] == pytest.approx(0.91)
    assert conv["test_accuracy"]["std"] == pytest.approx(statistics.stdev([0.90, 0.92]))
    assert conv["select.accuracy"]["values"] == [0.8, 0.9]
    assert light["seeds"] == 2 and light["test_accuracy"]["values"] == [0.6, 0.8]
    assert light["select.accuracy"]["values"] == [0.7, 0.75]
    md = tables.markdown(entries, ["test_accuracy"])
    assert "| conv2d | 2 | 10 | 0.9100 ± 0.0141 | 0.9000, 0.9200 |" in md


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert tables.main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "a_s0").mkdir()
    (tmp_path / "a_s0" / "results.json").write_text("{broken")
    assert tables.main([str(tmp_path)]) == 2
    assert "is damaged" in capsys.readouterr().err


def test_chart_is_written(tmp_path):
    _write(tmp_path / "runs" / "a_s0", total_params=1, test_accuracy=0.5)
    _write(tmp_path / "runs" / "a_s1", total_params=1, test_accuracy=0.7)
    assert tables.main([str(tmp_path / "runs"), "--metrics=test_accuracy", f"--chart={tmp_path / 'c'}"]) == 0
    assert (tmp_path / "c_test_accuracy.png").stat().st_size > 1000
