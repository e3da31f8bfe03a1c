"""Honest numbers: count model evaluations inside the model (an APPLY_MODEL wrapper on a clone).

NFE counts evaluations that include the conditional pass (a CFG pair batched or split counts once);
unconditional passes are counted separately, since that is what guidance tweaks save. cond_rows counts the
conditional pass's latents (a calibration on part of its batch costs that part).
"""
import threading
import time

import comfy.patcher_extension

KEY = "stride_call_counter"


class ModelCallCounter:
    """Counts over every run of its clone until reset(), from any thread (ComfyUI's multi-GPU work units call
    wrappers from worker threads): updates under a lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.cond = 0
        self.cond_rows = 0
        self.uncond = 0
        self.seconds = 0.0

    @property
    def nfe(self):
        return self.cond

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        chunks = transformer_options.get("cond_or_uncond", [0])
        start = time.perf_counter()
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        with self.lock:
            self.cond += 0 in chunks
            self.cond_rows += x.shape[0] // len(chunks) if 0 in chunks else 0
            self.uncond += 1 in chunks
            self.seconds += time.perf_counter() - start
        return out


def count_model_calls(model):
    """(clone of the ModelPatcher with a counter attached, the counter); the original is untouched."""
    counter = ModelCallCounter()
    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY, counter)
    return clone, counter
