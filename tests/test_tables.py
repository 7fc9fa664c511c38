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
    assert md.splitlines()[0] == ("| row | seeds | synthetic | select_split | checkpoint | total_params | "
                                  "test_accuracy | per seed (test_accuracy) |")
    # conv2d's results.json files do not say: unknown (?), and the best checkpoint (older runs)
    assert "| conv2d | 2 | ? | ? | best | 10 | 0.9100 ± 0.0141 | 0.9000, 0.9200 |" in md
    assert "| light_k2 | 2 | ? | val | best | 5 |" in md


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


def _run(path, seed, synthetic=False, select_split="val", kept=None, acc=0.9):
    r = dict(total_params=7, test_accuracy=acc + seed / 100, synthetic=synthetic, select_split=select_split)
    if kept:
        r["kept_checkpoint"] = kept
    _write(path / f"light_s{seed}", **r)


def test_rows_show_what_their_figures_rest_on(tmp_path):
    _run(tmp_path / "a", 0, synthetic=True, select_split="test", kept="last")
    _run(tmp_path / "a", 1, synthetic=True, select_split="test", kept="last")
    entries = tables.table(tables.collect(str(tmp_path / "a")), ["test_accuracy"])
    assert [(e["synthetic"], e["select_split"], e["kept_checkpoint"]) for e in entries] == [(True, "test", "last")]
    assert "| light | 2 | true | test | last | 7 | 0.9050 ± 0.0071 |" in tables.markdown(entries, ["test_accuracy"])


@pytest.mark.parametrize("key,values", [("synthetic", (False, True)), ("select_split", ("val", "test")),
                                        ("kept", (None, "last"))])
def test_a_row_mixing_settings_is_refused(tmp_path, capsys, key, values):
    for seed, value in enumerate(values):
        _run(tmp_path, seed, **{key: value})
    with pytest.raises(tables.UserError, match=r"row 'light' mixes runs that differ in ") as e:
        tables.table(tables.collect(str(tmp_path)), ["test_accuracy"])
    assert "light_s0" in str(e.value) and "light_s1" in str(e.value) and "\n" not in str(e.value)
    assert tables.main([str(tmp_path), "--metrics=test_accuracy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: row 'light' mixes runs") and err.count("\n") == 1
