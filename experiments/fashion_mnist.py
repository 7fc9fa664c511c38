"""The LightLayers paper's Table 2 (Fashion-MNIST): --method=conv2d|separable|light --k.

    python launch.py --experiment=fashion_mnist --method=light --k=5 --num_seeds=3

Paper protocol: Adam 1e-3, 10 epochs, batch 64, ReduceLROnPlateau(0.1, patience 3),
EarlyStopping(10); checkpoint selection on a 5,000-image hold-out of train here.
--paper_protocol reproduces the paper's own choices: all 60,000 training images in
stored order, the LR/early-stopping callbacks on the test split, the last epoch's weights.
"""

from experiments import training

main = training.main  # configs/fashion_mnist.py -> experiments/plan.py -> train
