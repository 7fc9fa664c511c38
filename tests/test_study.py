"""The study's comparison says what it shows: dead rows flagged, time columns explained, one progress
view with an ETA (lightflax.tables, lightflax.progress.Study)."""

import numpy as np
import pytest

from lightflax import figures, progress, tables


def _log_probs(probs):
    return np.log(np.asarray(probs, np.float64))


def test_constant_predictions_are_dead_and_varied_ones_are_not():
    constant = _log_probs([[0.3, 0.7]] * 50)  # one class predicted, AUC 0.5 with ties
    assert tables.prediction_spreads(constant)[0] < 1e-12
    assert tables.dead_flag(tables.prediction_spreads(constant)) == "dead: constant predictions"
    # one class always predicted, yet the probabilities tell images apart: a biased live model, not dead
    rng = np.random.default_rng(0)
    p1 = rng.uniform(0.6, 0.9, 50)
    biased = _log_probs(np.stack([1 - p1, p1], -1))
    spread = tables.prediction_spreads(biased)[0]
    assert spread == pytest.approx(np.std(p1)) and spread > 0.05
    assert tables.dead_flag([spread]) is None
    # just below / above the threshold; replicas (R, N, C), some dead
    tiny = np.full(50, 0.7) + np.r_[1e-7, np.zeros(49)]
    assert tables.prediction_spreads(_log_probs(np.stack([1 - tiny, tiny], -1)))[0] < tables.DEAD_SPREAD
    assert tables.dead_flag([0.0, spread, 0.0]) == "dead: constant predictions (2/3 seeds)"
    assert tables.prediction_spreads(np.stack([constant, biased])) == [pytest.approx(0.0, abs=1e-12),
                                                                        pytest.approx(spread)]
    assert tables.dead_flag(None) is None and tables.dead_flag([]) is None


def _result(spread, **kw):
    r = {"total_params": 1000, "trainable_params": 900, "size_bytes": 20480, "test_accuracy": None,
         "select_split": "val", "select_metrics": {"accuracy": 0.74, "roc_auc": 0.5},
         "majority_baseline": {"val": 0.74}, "time_per_epoch_s": 1.5, "total_time_s": 30.0,
         "row_wall_s": 41.5, "prediction_spread": spread}
    return dict(r, **kw)


def test_the_table_and_the_figure_flag_a_dead_row(tmp_path, monkeypatch):
    rows = tables.comparison_rows([_result([0.0]), _result([0.2]),
                                   _result([0.1], feature_extraction_s=12.25, time_per_epoch_s=0.12)],
                                  ["K=1", "Conv2D", "transfer"])
    assert [r["dead"] for r in rows] == ["dead: constant predictions", None, None]
    md = tables.comparison_markdown(rows)
    lines = md.splitlines()
    head = lines[0].split(" | ")
    assert lines[2].startswith("| K=1 (dead: constant predictions) | ")
    assert lines[3].startswith("| Conv2D | ") and "dead" not in lines[3] and "dead" not in lines[4]
    wall, features = head.index("wall s"), head.index("features s")
    assert lines[2].split(" | ")[wall] == "41.5" and lines[4].split(" | ")[features] == "12.2"
    assert lines[2].split(" | ")[features] == "null"
    assert tables.TIME_COLUMNS_NOTE in md and "head's epochs on cached features" in md
    saved = {}
    monkeypatch.setattr(figures, "save", lambda fig, path, banner=None: saved.setdefault("fig", fig) and path)
    tables.comparison_figure(str(tmp_path / "c.png"), rows, "x")
    for ax in saved["fig"].axes:
        assert [p.get_hatch() for p in ax.patches] == ["xx", None, None]
        assert "dead: constant predictions" in ax.get_xticklabels()[0].get_text()
        assert "dead" not in ax.get_xticklabels()[1].get_text()
    assert "head on cached features" in saved["fig"].axes[-1].get_title()


def test_the_study_line_and_its_eta_on_a_fake_clock(capsys):
    now = [100.0]
    study = progress.Study([("K=1 (28 px)", 1000), ("K=2 (28 px)", 1000), ("Conv2D (64 px)", 1000),
                            ("transfer", 500)], clock=lambda: now[0])
    progress.set_mode("epochs")
    try:
        now[0] = 103.0  # data loading
        study.start(0)
        assert capsys.readouterr().out == "row 1/4 K=1 (28 px)  elapsed 0:03  ETA ?\n"
        now[0] = 143.0
        assert study.done(0) == 40.0
        study.start(1)  # 1000 steps in 40 s: 25 steps/s; 2500 steps left
        assert capsys.readouterr().out == "row 2/4 K=2 (28 px)  elapsed 0:43  ETA 1:40\n"
        now[0] = 203.0
        study.done(1)  # 2000 steps in 100 s: 20 steps/s; 1500 left
        assert study.line(2) == "row 3/4 Conv2D (64 px)  elapsed 1:43  ETA 1:15"
        assert study.line(2, bar=True) == "[##########..........] " + study.line(2)
        study.start(2)
        now[0] = 205.0
        study.done(2, skipped=True)  # a skipped row leaves the rate alone
        assert study.eta(3) == pytest.approx(500 / 20)
        now[0] = 3803.0
        assert study.finish() == 3703.0
        assert capsys.readouterr().out.splitlines()[-1] == "study: 3/4 rows in 1:01:43 (3703.0 s)"
        progress.set_mode("bars")
        study.start(3)
        assert capsys.readouterr().out.startswith("[###############.....] row 4/4 transfer  elapsed 1:01:43")
        progress.set_mode("quiet")
        study.start(3)
        assert capsys.readouterr().out == ""
    finally:
        progress.set_mode("auto")


def test_the_study_keeps_compiled_programs_in_the_user_cache(tmp_path, monkeypatch):
    import jax

    from experiments import xray_compare

    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    monkeypatch.setenv("LIGHTFLAX_CACHE_DIR", str(tmp_path))
    try:
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
        assert xray_compare.compilation_cache() == str(tmp_path / "jax") == jax.config.jax_compilation_cache_dir
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))  # the user's own wins
        assert xray_compare.compilation_cache() == str(tmp_path / "mine") == jax.config.jax_compilation_cache_dir
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
