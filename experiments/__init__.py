"""Experiment files: flags and composition only (run through launch.py)."""
