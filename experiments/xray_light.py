"""The study's LightLayers (K = k) rows on chest X-rays.

    python launch.py --experiment=xray_light --k=5
    python launch.py --experiment=xray_light --k=5 --dataset=pneumonia_mnist --image_size=64
    python launch.py --experiment=xray_light --k=5 --recipe=robust

Defaults reproduce the study's protocol (Adam 1e-3, 20 epochs, batch 64, 299x299,
best checkpoint by validation loss, test at the end) with its flaws fixed
(BUILD_NOTES.md, docs/results.md). Without data it falls back to labelled synthetic data.
--recipe=robust applies experiments/recipes.py's robust(config); flags given on the
command line override its values.
"""

from experiments import training

main = training.main  # configs/xray_light.py -> experiments/plan.py -> train
