"""configs/<experiment>.py -> experiments.plan.resolve -> Plan: every experiment's config resolves,
a short flag and its --config.PATH give the same plan, and a run folder written before the configs
(tests/data/run_v1: results.json and model.msgpack of a 1-epoch synthetic xray_light run made by the
previous entry layer) stays readable by predict, lightflax.tables and --resume's settings check."""

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from absl import flags

from conftest import REPO

TRAINING = ("xray_light", "xray_conv2d", "xray_transfer", "xray_compare", "mnist", "fashion_mnist", "cifar10",
            "cifar100")
RUN_V1 = Path(__file__).parent / "data" / "run_v1"


def _parsed(experiment, argv, tmp_path):
    """(config, explicit) as launch.py builds them from ``argv`` (in a private FlagValues)."""
    from ml_collections import config_flags

    from experiments import cli

    fv = flags.FlagValues()
    cli.define(importlib.import_module(f"configs.{experiment}").get_config(), fv)
    argv = ["prog", f"--workdir={tmp_path / 'w'}", *argv]
    config_flags.DEFINE_config_file("config", default=str(REPO / "configs" / f"{experiment}.py"), flag_values=fv,
                                    sys_argv=argv)
    fv(argv)
    config, explicit = cli.apply(fv.config, argv[1:], fv)
    cli.check(config)
    return config, explicit


@pytest.mark.parametrize("experiment", TRAINING)
def test_every_experiment_config_resolves(experiment, tmp_path):
    from experiments import plan

    config, explicit = _parsed(experiment, ["--dataset=synthetic"], tmp_path)
    p = plan.resolve(config, explicit)
    assert p.experiment == experiment and p.dataset == "synthetic" and p.workdir == str(tmp_path / "w")
    assert p.rows and all(r.run.experiment == experiment for r in p.rows)
    if experiment == "xray_compare":
        assert [r.run.workdir for r in p.rows[:6]] == [str(tmp_path / "w" / s) for s in
                                                       ("light_k1", "light_k2", "light_k3", "light_k4", "light_k5",
                                                        "conv2d")]
        assert p.rows[5].run.image_size >= plan.min_input_size("xray_conv2d")
    else:
        assert len(p.rows) == 1 and p.rows[0].run.workdir == p.workdir
    assert (p.rows[0].run.transfer is not None) == (experiment == "xray_transfer")


def test_default_workdir_and_image_size_are_chosen_once(tmp_path, monkeypatch):
    from experiments import plan

    monkeypatch.chdir(tmp_path)
    config, explicit = _parsed("xray_conv2d", ["--dataset=pneumonia_mnist"], tmp_path)
    config.workdir = None
    p = plan.resolve(config, explicit)
    assert p.rows[0].run.image_size == 64  # the smallest standard size Conv2D takes on PneumoniaMNIST
    assert Path(p.workdir).parent == Path("runs") and Path(p.workdir).name.startswith("xray_conv2d-64px-")


@pytest.mark.parametrize("experiment, short, long", [
    ("xray_light", ["--k=3", "--epochs=2", "--recipe=robust"],
     ["--config.model.k=3", "--config.schedule.epochs=2", "--config.recipe=robust"]),
    ("mnist", ["--method=conv2d", "--paper_protocol", "--image_size=32"],
     ["--config.model.method=conv2d", "--config.paper_protocol=True", "--config.data.image_size=32"]),
    ("xray_transfer", ["--backbone=efficientnet_lite0", "--finetune_blocks=1"],
     ["--config.transfer.backbone=efficientnet_lite0", "--config.transfer.finetune_blocks=1"]),
])
def test_a_short_flag_and_its_config_path_give_the_same_plan(experiment, short, long, tmp_path):
    from experiments import plan

    plans = [plan.resolve(*_parsed(experiment, ["--dataset=synthetic", *argv], tmp_path)) for argv in (short, long)]
    assert plans[0] == plans[1]
    default = plan.resolve(*_parsed(experiment, ["--dataset=synthetic"], tmp_path))
    assert plans[0] != default  # the flags did change the plan


def test_a_recipe_keeps_what_the_command_line_gave(tmp_path):
    from experiments import plan

    p = plan.resolve(*_parsed("xray_light", ["--dataset=synthetic", "--recipe=robust", "--num_seeds=2"], tmp_path))
    run = p.rows[0].run
    assert (run.num_seeds, run.lr_schedule, run.decision) == (2, "cosine", "prior_corrected")
    assert p.record["recipe_overrides"] == {"num_seeds": 2} and p.record["flags"]["num_seeds"] == 2


def test_the_shift_recipe_resolves_through_the_plan(tmp_path):
    from experiments import plan

    p = plan.resolve(*_parsed("xray_light", ["--dataset=synthetic", "--recipe=shift"], tmp_path))
    run = p.rows[0].run
    assert (run.num_seeds, run.lr_schedule, run.decision, run.augment) == (3, "cosine", "prior_corrected",
                                                                            "acquisition")
    assert p.record["recipe"] == "shift" and p.record["predict_defaults"]["adapt_bn"] is True
    p = plan.resolve(*_parsed("xray_light", ["--dataset=synthetic", "--recipe=robust"], tmp_path))
    assert p.rows[0].run.augment == "none" and "predict_defaults" not in p.record  # robust unchanged


def test_a_run_folder_from_before_the_configs_stays_readable(tmp_path):
    """predict scores it, tables lists it, and its saved config passes --resume's settings check."""
    from lightflax import predict, tables
    from lightflax.config import RunConfig
    from lightflax.train import check_resume_settings

    run = tmp_path / "runs" / "old"
    shutil.copytree(RUN_V1, run)
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", images=images)
    probs, preds = predict.predict_npz(str(run), str(tmp_path / "in.npz"), str(tmp_path / "out.npz"))
    assert probs.shape == (3, 2) and np.allclose(probs.sum(axis=1), 1, atol=1e-5) and preds.shape == (3,)
    assert list(tables.collect(str(tmp_path / "runs"))) == ["old"]
    saved = json.loads((run / "results.json").read_text())["config"]
    now = RunConfig.from_json(saved)
    flat = now.to_json()  # the flat form results.json records is unchanged by the sections; fields added
    assert {k: v for k, v in flat.items() if k in saved} == saved  # since (checkpoint_every) take defaults
    default = RunConfig.flat(workdir="d", model="xray_light").to_json()
    assert all(default[k] == v for k, v in flat.items() if k not in saved)
    check_resume_settings(now, saved)  # the same settings: no complaint
    with pytest.raises(Exception, match="--resume with settings that differ"):
        check_resume_settings(now.replace(batch_size=16), saved)


def _documented_commands():
    """Every `python launch.py --experiment=...` command of README.md, docs/*.md and the experiments'
    docstrings, with the docs' shell variables filled in ($C: docs/robust.md's common flags)."""
    import re

    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "experiments").glob("*.py")),
            REPO / "launch.py"]
    subst = {"$C": "--dataset=pneumonia_mnist --num_seeds=3 --replica_mode=loop --kernels=native", "${k}": "1",
             "$k": "1", "${s}": "0", "$s": "0"}
    out = set()
    for path in docs:
        for m in re.finditer(r"python launch\.py (--experiment[= ][a-z_0-9]+[^`|)\n]*)", path.read_text()):
            line = m.group(1).split("#")[0].split(";")[0]
            for var, value in subst.items():
                line = line.replace(var, value)
            out.add(" ".join(a for a in line.split() if not a.startswith(("[", "...")) and a != "--helpfull"))
    return sorted(out)


@pytest.mark.parametrize("command", _documented_commands())
def test_every_documented_command_still_parses(command, tmp_path):
    """Each flag of each documented command is still a flag of its experiment (an alias of a config
    field) and its value is accepted; training experiments also resolve to a plan."""
    argv = command.replace("--experiment ", "--experiment=").split()
    experiment = argv[0].split("=", 1)[1]
    args = [a for a in argv[1:] if not a.startswith("--workdir")]
    config, explicit = _parsed(experiment, args, tmp_path)
    if experiment in TRAINING:
        from experiments import plan

        config.data.dataset, config.data.data_dir, config.data.manual_dir = "synthetic", None, None  # offline
        plan.resolve(config, explicit)


@pytest.mark.parametrize("override, message", [
    ("--config.model.k=0", "--k must be >= 1"), ("--config.runtime.dtype=float16", "--dtype must be one of"),
    ("--config.optimizer.learning_rate=nan", "--learning_rate must be a finite number"),
    ("--config.model.dropout=1.5", "--dropout must be <= 0.99")])
def test_a_config_override_is_checked_like_its_short_flag(override, message, tmp_path):
    from lightflax.errors import UserError

    with pytest.raises(UserError, match=message):
        _parsed("xray_light", [override], tmp_path)


def test_the_paper_protocol_is_in_the_plan_and_the_data_notes(tmp_path):
    from experiments import plan, training

    p = plan.resolve(*_parsed("mnist", ["--dataset=synthetic", "--paper_protocol", "--synthetic_size=8"], tmp_path))
    run = p.rows[0].run
    assert (run.callbacks.select_split, run.data.shuffle, run.callbacks.keep) == ("test", False, "last")
    assert p.load["synthetic_shape"] == (28, 28, 1) and p.data_notes == (plan.PAPER_NOTE,)
    assert plan.PAPER_NOTE in training.load(p).notes
    with pytest.raises(Exception, match="--paper_protocol selects on the test split"):
        plan.resolve(*_parsed("mnist", ["--dataset=synthetic", "--paper_protocol", "--select_split=val"], tmp_path))
