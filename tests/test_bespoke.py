"""Bespoke solvers (Shaul et al. 2024, arXiv:2310.19075): the scale-time transformation of Euler / midpoint.

Pure math on the exact oracle (the identity parameters are ComfyUI's euler and dpm_2 bit for bit, EPS and flow;
the teacher's Hermite reading; the text round trip; fitted solvers beat their base on held-out noises; a losing fit
is refused), then the nodes in the real ComfyUI."""
import json
import logging
import time

import pytest
import torch

import comfy.k_diffusion.sampling as kds
import comfy.sample
import comfy.samplers

LABELS = torch.tensor([0, 3, 5, 8])
RANGES = {False: (0.0292, 14.6), True: (0.01, 1.0)}


@pytest.fixture(scope="module")
def m(stride, guided_oracle):
    class Modules:
        guided = staticmethod(guided_oracle)
        bespoke = stride("samplers.bespoke")
        common = stride("samplers.schedules.common")
    return Modules


def noises(flow, seed, batch=8):
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x if flow else x * RANGES[False][1]


def schedule(m, flow, steps):
    """karras (rho 7) on the EPS oracle's range; uniform in sigma from 1 (ComfyUI's simple, unshifted) on flow."""
    smin, smax = RANGES[flow]
    if flow:
        inner = torch.linspace(smax, smin, steps, dtype=torch.float64)
        return torch.cat([inner, inner.new_zeros(1)])
    return kds.get_sigmas_karras(steps, smin, smax).double()


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("base,comfy_fn", [("rk1", kds.sample_euler), ("rk2", kds.sample_dpm_2)])
def test_identity_is_comfyui_euler_and_dpm_2_exactly(m, flow, base, comfy_fn):
    d, x, sigmas = m.guided(flow, LABELS), noises(flow, 0, 4), schedule(m, flow, 5)
    model = lambda x_, s_, **kw: d(x_, s_)
    want = comfy_fn(model, x.clone(), sigmas, disable=True)
    solver = m.bespoke.Bespoke.identity(base, sigmas)
    assert torch.equal(m.bespoke.sample_bespoke(model, x.clone(), sigmas, solver=solver), want)
    assert torch.equal(solver.times()[:-1:1 if base == "rk1" else 2], sigmas[:-1])
    solver.log_s = solver.log_s + 0.01
    assert not torch.equal(m.bespoke.sample_bespoke(model, x.clone(), sigmas, solver=solver), want)
