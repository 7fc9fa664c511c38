"""The train step's memory from XLA's memory analysis, checked before the run allocates anything:
the step is compiled on abstract shapes, checked against the available memory, then run as is."""

import numpy as np
import pytest

from lightflax import data, memory, timing, train
from lightflax.config import RunConfig
from lightflax.errors import UserError


def _run(tmp_path, **kw):
    d = data.load("synthetic", synthetic_shape=(16, 16, 1), synthetic_sizes={"train": 32, "val": 8, "test": 8},
                  num_classes=2, seed=0)
    cfg = RunConfig.flat(workdir=str(tmp_path / "w"), model="xray_light", model_kwargs={"k": 2}, batch_size=8,
                         image_size=16, epochs=1, **kw)
    return cfg, d


def test_compiled_need_is_xla_arithmetic():
    stats = {"argument_bytes": 1000, "output_bytes": 600, "alias_bytes": 500, "temp_bytes": 70,
             "generated_code_bytes": 3}
    assert memory.compiled_need_bytes(stats, resident_bytes=11) == 1000 + 600 - 500 + 70 + 3 + 11
    assert memory.compiled_need_bytes(None) is None and memory.compiled_need_bytes({"argument_bytes": 1}) is None


def test_the_advice_fits_the_flags_given():
    assert memory.advice(4, 32, 64, need=4000, have=2500) == (
        "use --num_seeds=2 or fewer, or a smaller --batch_size (now 32), or a smaller --image_size (now 64)")
    assert memory.advice(1, 32, None, need=4000, have=2500) == "use a smaller --batch_size (now 32)"
    assert "--num_seeds" not in memory.advice(4, 32, 64, need=4000, have=500)  # not even one seed fits
    assert "does not fit" in memory.advice(1, 1, None, need=4000, have=10)


def test_a_step_too_large_is_refused_before_parameters_or_device_data_exist(tmp_path, monkeypatch):
    cfg, d = _run(tmp_path)
    seen = {}

    def available():
        seen["asked"] = True
        return 1000  # bytes: less than any train step

    monkeypatch.setattr(memory, "device_available_bytes", available)
    monkeypatch.setattr(train.Trainer, "init_state", lambda self: pytest.fail("parameters allocated first"))
    monkeypatch.setattr(train.Trainer, "device_split", lambda self, s: pytest.fail("data put on the device first"))
    with pytest.raises(UserError) as e:
        train.train_and_evaluate(cfg, d)
    msg = str(e.value)
    assert seen and "\n" not in msg and "XLA's memory analysis" in msg and "nothing was allocated" in msg
    assert "--batch_size (now 8)" in msg and "--image_size (now 16)" in msg and "--num_seeds" not in msg
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_the_checked_step_is_the_one_the_loop_runs(tmp_path, monkeypatch):
    cfg, d = _run(tmp_path, num_seeds=2)
    calls, checked = [], {}
    real_compile, real_check = timing.aot_compile, memory.check_compiled

    def counting(*a, **k):
        calls.append(a[0])
        return real_compile(*a, **k)

    def recording(need, have, *rest):
        checked.update(need=need, have=have)
        return real_check(need, have, *rest)

    monkeypatch.setattr(timing, "aot_compile", counting)
    monkeypatch.setattr(memory, "check_compiled", recording)
    results = train.train_and_evaluate(cfg, d)
    assert len(calls) == 1  # compiled once, on abstract shapes, and run on the real arguments
    xla = results["memory"]
    assert xla["xla_temp_bytes"] > 0 and checked["have"] and 0 < checked["need"] < checked["have"]
    step = memory.compiled_need_bytes({k[4:]: v for k, v in xla.items() if k.startswith("xla_")})
    resident = xla["xla_output_bytes"] + d.splits["val"].images.nbytes + np.asarray(d.splits["val"].labels).nbytes
    assert checked["need"] == step + resident


def test_the_abstractly_compiled_step_computes_what_the_concrete_one_does(tmp_path):
    import jax

    cfg, d = _run(tmp_path)
    tr = train.Trainer(cfg, d)
    abstract = tr.abstract_compile()
    images, labels = tr.device_split("train")
    concrete = timing.aot_compile(tr, tr.init_state(), images, labels, tr.permutations(0), tr.data_keys())
    a, ma = abstract.compiled(tr.init_state(), images, labels, tr.permutations(0), tr.data_keys(), tr.dev_ids)
    b, mb = concrete.compiled(tr.init_state(), images, labels, tr.permutations(0), tr.data_keys(), tr.dev_ids)
    for x, y in zip(jax.tree_util.tree_leaves((a.params, a.batch_stats, a.opt_state, ma)),
                    jax.tree_util.tree_leaves((b.params, b.batch_stats, b.opt_state, mb))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit for bit, values and updates
