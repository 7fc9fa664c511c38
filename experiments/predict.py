"""Scores a finished run on an external npz, without retraining.

    python launch.py --experiment=predict --workdir=RUN_DIR --input_npz=IN.npz --output_npz=OUT.npz

Reads the run's model configuration and decision rule from RUN_DIR/results.json
and its exported weights (model.msgpack, or model_seed<r>.msgpack of each replica
of a --num_seeds run), applies the run's own preprocessing (resize to its input
resolution, gray->RGB, /255, mean subtraction) to ``images`` of IN.npz (uint8,
(N,H,W) or (N,H,W,C)) and writes ``probabilities`` (N, num_classes; a
multi-seed run's replicas averaged unless --seed_index picks one) and
``predictions`` (N,; the run's decision rule, argmax for runs without one) to
OUT.npz, with one summary line. --explain=occlusion|gradcam adds ``heatmaps``
(N, H, W) float32 of the predicted class at the input's resolution
(--explain_patch/--explain_stride for occlusion; --explain_dir=DIR: one overlay
PNG per image); see docs/explain.md. Test-time adaptation: --adapt_bn (BatchNorm
statistics of all the input images), --label_shift=em (the class prior
re-estimated from the predictions), --calibrate=temperature (the run's
validation-fitted temperature); their defaults are the run's stored
``predict_defaults`` (none for the study and robust recipes), else off.
"""

from lightflax import predict

from lightflax.errors import UserError


def main(config, explicit=frozenset()):
    del explicit
    explain = None
    if config.explain:
        explain = {"method": config.explain, "patch": config.explain_patch, "stride": config.explain_stride,
                   "explain_dir": config.explain_dir}
    elif config.explain_dir or config.explain_patch or config.explain_stride:
        raise UserError("--explain_dir/--explain_patch/--explain_stride need --explain=occlusion or gradcam")
    predict.predict_npz(config.workdir, config.input_npz, config.output_npz, batch_size=config.optimizer.batch_size,
                        seed_index=config.seed_index, explain=explain,
                        adapt_options={"adapt_bn": config.adapt_bn, "label_shift": config.label_shift,
                                       "calibrate": config.calibrate})
