"""Schedule optimizers: the sigma schedule fitted to a model, solver and guidance (pure PyTorch).

Each optimizer works on a plain denoiser D(x, sigma[B]) -> x0_hat and calibration noises; the ComfyUI nodes
in nodes/schedules.py hand them the user's guided model.
"""
