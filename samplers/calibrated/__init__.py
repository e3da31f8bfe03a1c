"""Calibrated solvers: zero-NFE corrections to a base solver whose coefficients are measured once on the
user's model (DC-Solver compensation ratios, IIA coefficients). Pure PyTorch; the ComfyUI side is in
nodes/calibrated.py."""
