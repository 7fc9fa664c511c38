"""The entry layer: one small main per experiment (``python launch.py --experiment=NAME``), its
config in configs/NAME.py; experiments/cli.py (the flags), plan.py (config -> plan), recipes.py,
training.py (plan -> trained rows)."""
