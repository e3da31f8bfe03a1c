"""Stride's stateful wrappers under ComfyUI's threads: newer ComfyUI calls model wrappers from worker threads on
per-device clones within one sampling run (multi-GPU work units). Here one patched model's run is driven by a
sampler that advances four trajectories (sub-batches of 1, 2, 3 and 4 images, so each is a cache chunk of its own)
from four threads at once; every trajectory must come out as when the four run one after another, and the run's
log must count the same.

A DIFFUSION_MODEL wrapper that sleeps a moment inside every model call makes the threads interleave in the middle
of each call (between a cache's bookkeeping and its blocks), so state shared between calls would show."""
import logging
import re
import threading
import time

import pytest
import torch

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
from test_accel_comfy import demo

SIZES = [1, 2, 3, 4]


def interleaved(model):
    """A clone whose every diffusion-model call yields the CPU to the other threads half way."""
    def wrapper(executor, *args, **kwargs):
        time.sleep(0.003)
        return executor(*args, **kwargs)
    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_interleave", wrapper)
    return clone


def threaded_euler(together):
    """A SAMPLER: Euler on each sub-batch of SIZES, the sub-batches advanced from threads at once (together) or one
    after another."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        parts = list(torch.split(x, SIZES))
        errors = []

        def trajectory(i):
            try:
                y = parts[i]
                for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                    denoised = model(y, s * y.new_ones(y.shape[0]), **(extra_args or {}))
                    y = y + (s_next - s) * (y - denoised) / s
                parts[i] = y
            except Exception as error:  # reported by the test, with the sub-batch
                errors.append((SIZES[i], error))
        if together:
            threads = [threading.Thread(target=trajectory, args=(i,)) for i in range(len(SIZES))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
        else:
            for i in range(len(SIZES)):
                trajectory(i)
        assert not errors, errors
        return torch.cat(parts)
    return comfy.samplers.KSAMPLER(sample)


def run(model, pos, neg, latent, scheduler, together, steps=8, cfg=3.0):
    batch = latent["samples"].repeat(sum(SIZES), 1, 1, 1)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    noise = comfy.sample.prepare_noise(batch, 7)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, noise, cfg, threaded_euler(together), sigmas, pos, neg, batch,
                                          seed=7, disable_pbar=True)


def run_logs(records, prefix):
    """The Stride log lines starting with `prefix`, with timings blanked out."""
    return [re.sub(r"[\d.]+ s\b|x[\d.]+", "#", r.getMessage()) for r in records if r.getMessage().startswith(prefix)]


def concurrently(model, pos, neg, latent, scheduler, caplog, prefix):
    """(result, log) of the sub-batches one after another, then (result, log) of the sub-batches at once."""
    outs = []
    for together in (False, True):
        with caplog.at_level(logging.INFO):
            caplog.clear()
            out = run(model, pos, neg, latent, scheduler, together)
            outs += [out, run_logs(caplog.records, prefix)]
    return outs


CASES = {
    "step cache (input change)": ("dit_small", "simple", "Stride step cache",
                                  lambda nc, m: nc("StrideStepCache").execute(m, 0.3, 0.0, 1.0, 2, "input change")),
    "step cache (first block residual)": ("dit_small", "simple", "Stride step cache",
                                          lambda nc, m: nc("StrideStepCache").execute(m, 5.0, 0.0, 1.0, 1,
                                                                                      "first block residual")),
    "step cache (UNet)": ("unet_small", "karras", "Stride step cache",
                          lambda nc, m: nc("StrideStepCache").execute(m, 0.3, 0.0, 1.0, 2, "input change")),
    "T-Stitch": ("dit_large", "simple", "Stride T-Stitch",
                 lambda nc, m: nc("StrideTStitch").execute(m, demo(nc, "dit_small")[0], 0.5)),
    "CFG schedule": ("dit_small", "simple", "Stride CFG schedule",
                     lambda nc, m: nc("StrideCFGSchedule").execute(m, "interval", 0.3, 0.7, 1.0, "", "progress")),
    "RAAG": ("dit_small", "simple", None, lambda nc, m: nc("StrideRAAG").execute(m, 5.0, 2.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_patched_model_called_from_four_threads_at_once(node_class, caplog, case):
    name, scheduler, prefix, patch = CASES[case]
    model, pos, neg, latent = demo(node_class, name, "3")
    patched = interleaved(patch(node_class, model).result[0])
    alone, alone_log, together, together_log = concurrently(patched, pos, neg, latent, scheduler, caplog,
                                                            prefix or "Stride")
    for size, a, b in zip(SIZES, torch.split(alone, SIZES), torch.split(together, SIZES)):
        assert torch.equal(a, b), f"{case}: the sub-batch of {size} differs when its calls run beside other threads"
    if prefix:
        assert len(alone_log) == 1 and together_log == alone_log


def test_the_cache_plan_from_four_threads(node_class, calibration_store, caplog):
    model, pos, neg, latent = demo(node_class, "dit_small", "3")
    with torch.inference_mode():
        planned = node_class("StrideCalibrateCachePlan").execute(model, pos, neg, latent, "euler", "simple", 8, 3.0,
                                                                 1, 5, 0.5, 0.3, 0.1).result[0]
    alone, alone_log, together, together_log = concurrently(interleaved(planned), pos, neg, latent, "simple", caplog,
                                                            "Stride cache plan:")
    for size, a, b in zip(SIZES, torch.split(alone, SIZES), torch.split(together, SIZES)):
        assert torch.equal(a, b), f"cache plan: the sub-batch of {size} differs beside other threads"
    assert "block evaluations reused" in alone_log[0] and together_log == alone_log


def test_the_call_counter_counts_every_thread(stride, node_class):
    model, pos, neg, latent = demo(node_class, "dit_small", "3")
    counted, counter = stride("nodes.counting").count_model_calls(interleaved(model))
    counts = []
    for together in (False, True):
        counter.reset()
        run(counted, pos, neg, latent, "simple", together)
        counts.append((counter.cond, counter.uncond))
    assert counts[0] == counts[1] and counts[0][0] == len(SIZES) * 8
