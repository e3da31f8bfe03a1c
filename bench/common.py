"""Shared pieces of the benchmark programs: arguments, the model setups, running one sampling setup."""
import argparse
import contextlib
import json
import math
import shutil
import tempfile
import time

import torch

from . import host
from .reference import error_vs_reference, oracle_reference



def parser(description):
    # One intra-op thread: the models' small tensors gain nothing from two, and two threads slow down
    # badly whenever another process shares the 2-core machine.
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a small subset (under 60 s on a 2-core CPU)")
    p.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    return p


def error_ratio(ours, base):
    """Our error over a baseline's, for win/loss tables: a failed run of ours (inf) or of the baseline (inf or None:
    nothing to compare with) counts as a loss (inf), never a win; two exact results tie (1.0)."""
    if ours is None or base is None or not math.isfinite(ours) or not math.isfinite(base):
        return math.inf
    if base == 0:
        return 1.0 if ours == 0 else math.inf
    return ours / base


def read_merged(paths):
    """The --json outputs at the comma-separated paths merged: plans and lists joined, the last run's record."""
    data = {"plan": {}, "rows": [], "calibrations": []}
    for path in paths.split(","):
        with open(path) as f:
            part = json.load(f)
        data["plan"].update(part["plan"])
        data["rows"] += part["rows"]
        data["calibrations"] += part.get("calibrations", [])
        data["run"] = part.get("run", {})
    return data


def write_json(path, data):
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
        print(f"\nwrote {path}")


class ModelSetup:
    """A demo model (the oracle, or a trained network), digits x seeds, their noise and conditioning."""

    def __init__(self, name, seeds, digits=range(10), shift=1.0, size=8):
        import comfy.sample
        demo = host.stride("nodes.demo")
        self.name = name
        self.is_oracle = name in demo.ORACLES
        self.counting = host.stride("nodes.counting")
        self.mixture = demo.load_mixture()  # the oracle, and the data standard deviation of the latent space
        self.labels = torch.tensor([d for _ in seeds for d in digits])
        self.model, self.positive, self.negative = demo.load_demo_model(name, self.labels, shift, False)
        self.model_sampling = self.model.get_model_object("model_sampling")
        one = torch.zeros(len(digits), 4, size, size)
        self.noise = torch.cat([comfy.sample.prepare_noise(one, s) for s in seeds])
        self.latent = torch.zeros_like(self.noise)

    def sample(self, sampler, sigmas, cfg):
        """Run ComfyUI's own sampling path (as SamplerCustom does); returns (x, counter, seconds)."""
        import comfy.sample
        model, counter = self.counting.count_model_calls(self.model)
        self.last_counter = counter
        start = time.perf_counter()
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            x = comfy.sample.sample_custom(model, self.noise, cfg, sampler, sigmas, self.positive, self.negative,
                                           self.latent, seed=0, disable_pbar=True)
        return x, counter, time.perf_counter() - start

    def reference(self, sigma_start, cfg, rtol):
        """x_ref from sigma_start: the exact oracle's, or the network's own PF-ODE solved to sigma_min."""
        if self.is_oracle:
            return oracle_reference(self.mixture, self.model_sampling, sigma_start, self.noise, self.labels, cfg, rtol)
        import comfy.samplers
        solver = host.stride("samplers.reference").sample_reference
        sigmas = torch.tensor([float(sigma_start), float(self.model_sampling.sigma_min), 0.0])
        x, _, _ = self.sample(comfy.samplers.KSAMPLER(solver, {"rtol": rtol, "atol": rtol}), sigmas, cfg)
        return x.double()


@contextlib.contextmanager
def fresh_calibration_store():
    """Stride's calibration store pointed at a new empty folder (and only there) while the block runs: nothing is
    reused from earlier runs."""
    import folder_paths
    store = host.stride("nodes.calibration_store")
    store.register()
    saved = folder_paths.folder_names_and_paths[store.FOLDER]
    folder = tempfile.mkdtemp(prefix="stride-bench-calibrations-")
    folder_paths.folder_names_and_paths[store.FOLDER] = ([folder], {".safetensors"})
    try:
        yield folder
    finally:
        folder_paths.folder_names_and_paths[store.FOLDER] = saved
        shutil.rmtree(folder, ignore_errors=True)


def run_against_reference(setup, references, sampler, sigmas, cfg, rtol, data_std):
    """(per-image errors, model-call counter, seconds) of one run against x_ref from the same first sigma and cfg
    (solved once per key into `references`). A Stride sampler that stops instead of returning NaN, and any
    non-finite error, count as diverged: error inf, seconds nan."""
    key = (cfg, round(float(sigmas[0]), 5))
    if key not in references:
        references[key] = setup.reference(sigmas[0], cfg, rtol)
    try:
        x, counter, seconds = setup.sample(sampler, sigmas, cfg)
        err = error_vs_reference(x, references[key], data_std)
    except host.stride("nodes.sampler_bridge").SampleNotFinite:
        counter, seconds, err = setup.last_counter, float("nan"), torch.full([1], math.inf)
    return torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf)), counter, seconds
