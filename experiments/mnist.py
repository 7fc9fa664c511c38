"""The LightLayers paper's Table 1 (MNIST): --method=conv2d|separable|light --k.

    python launch.py --experiment=mnist --method=light --k=3

Paper protocol: Adam 1e-3, 10 epochs, batch 64, ReduceLROnPlateau(0.1, patience 4),
EarlyStopping(10). The paper chose its checkpoint on the test split and did not
shuffle; here the best checkpoint is chosen on a 5,000-image hold-out of train
and every epoch is shuffled (--paper_protocol reproduces the paper's choices).
"""

from experiments import training

main = training.main  # configs/mnist.py -> experiments/plan.py -> train
