"""Shared pieces of the benchmark programs: arguments, the oracle setup, running one sampling setup."""
import argparse
import json
import time

import torch

from . import host


def parser(description):
    # One intra-op thread: the oracle's small tensors gain nothing from two, and two threads slow down
    # badly whenever another process shares the 2-core machine.
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a small subset (under 60 s on a 2-core CPU)")
    p.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    return p


def write_json(path, data):
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
        print(f"\nwrote {path}")


class OracleSetup:
    """The oracle model in one parameterization, digits x seeds, their noise and conditioning."""

    def __init__(self, param, seeds, digits=range(10)):
        import comfy.sample
        om = host.stride("nodes.oracle_model")
        self.counting = host.stride("nodes.counting")
        self.mixture = om.load_mixture()
        self.model = om.build_oracle_model(param)
        self.model_sampling = self.model.get_model_object("model_sampling")
        self.labels = torch.tensor([d for _ in seeds for d in digits])
        one = torch.zeros(len(digits), 4, 8, 8)
        self.noise = torch.cat([comfy.sample.prepare_noise(one, s) for s in seeds])
        self.latent = torch.zeros_like(self.noise)
        self.positive = om.digit_conditioning(self.labels)
        self.negative = om.digit_conditioning([-1])

    def sample(self, sampler, sigmas, cfg):
        """Run ComfyUI's own sampling path (as SamplerCustom does); returns (x, counter, seconds)."""
        import comfy.sample
        model, counter = self.counting.count_model_calls(self.model)
        start = time.perf_counter()
        x = comfy.sample.sample_custom(model, self.noise, cfg, sampler, sigmas, self.positive, self.negative,
                                       self.latent, seed=0, disable_pbar=True)
        return x, counter, time.perf_counter() - start
