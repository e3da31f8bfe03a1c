"""Honest progress for calibrations: the time estimate, logged after the first few evaluations, is their median
(the first call of a model is often far slower: allocations, caches, kernel selection), a long calibration logs its
remaining time, and the last line gives the evaluations and seconds measured."""
import logging
import re
import time

import torch

import comfy.patcher_extension
from test_accel_comfy import demo

COLD_S = 1.0


def cold_first_call(model):
    """A clone whose first diffusion-model call takes COLD_S seconds longer, like a model's first call on a GPU."""
    calls = []

    def wrapper(executor, *args, **kwargs):
        if not calls:
            time.sleep(COLD_S)
        calls.append(1)
        return executor(*args, **kwargs)
    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_cold", wrapper)
    return clone


def test_the_estimate_is_warm_and_the_last_line_is_measured(node_class, calibration_store, caplog, monkeypatch,
                                                            stride):
    monkeypatch.setattr(stride("nodes.calibration"), "LOG_EVERY_S", 0.0)  # log the remaining time at every step
    model, pos, neg, latent = demo(node_class, "dit_small", "37")
    with torch.inference_mode(), caplog.at_level(logging.INFO):
        node_class("StrideCalibrateIIA").execute(cold_first_call(model), pos, neg, latent, 3.0, "simple", 4, 2, 0,
                                                 "dpmpp_2m", "reference")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Stride IIA")]
    budget = float(re.search(r"calibration of about (\d+) model evaluations", next(
        m for m in lines if "calibration of" in m))[1])
    seconds = float(re.search(r"about (\d+) s in all \(an evaluation takes", next(
        m for m in lines if "s in all" in m))[1])
    assert seconds < COLD_S * budget / 4, lines  # a cold first evaluation would put it at >= COLD_S * budget
    assert any(re.search(r"\d+ of about \d+ model evaluations, about \d+ s to go", m) for m in lines), lines
    done = [m for m in lines if "calibration done" in m]
    assert len(done) == 1 and re.search(r"done: [\d.]+ model evaluations in [\d.]+ s", done[0]), done
