"""Bridge: the exact Gaussian-mixture oracle as a real ComfyUI MODEL (a BaseModel + ModelPatcher).

The diffusion module reads ComfyUI's own inputs (the scaled input, the timestep, the context) and
answers in the model's own output space, so every sampler, scheduler, wrapper and model-sampling
patch (ModelSamplingSD3, ...) of ComfyUI applies to it unchanged.
"""
import functools
import logging
import weakref

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models_base

from ..demo.oracle import UNCONDITIONAL, GaussianMixture

NUM_DIGITS = 10
PARAMETERIZATIONS = {"eps": comfy.model_base.ModelType.EPS, "flow": comfy.model_base.ModelType.FLOW}


@functools.lru_cache(maxsize=1)
def load_mixture():
    """The oracle's mixture, loaded once per process. Its tensors are made outside inference mode (ComfyUI runs
    nodes inside it) so that a later calibration with gradients (LD3, Bespoke) can differentiate through them."""
    with torch.inference_mode(False):
        return GaussianMixture.load()


def digit_conditioning(labels):
    """CONDITIONING selecting digits: one-hot [n, 1, 10]; a zero row (label -1) is unconditional."""
    labels = torch.as_tensor(labels, dtype=torch.int64).view(-1)
    onehot = torch.zeros(len(labels), 1, NUM_DIGITS)
    rows = (labels >= 0).nonzero().view(-1)
    onehot[rows, 0, labels[rows]] = 1.0
    return [[onehot, {}]]


def labels_from_context(context):
    if context is None or context.ndim != 3 or context.shape[-1] != NUM_DIGITS:
        shape = None if context is None else list(context.shape)
        raise ValueError("The Stride oracle model takes the digit conditioning of the Stride demo model "
                         f"loader ([batch, 1, {NUM_DIGITS}]); got a conditioning of shape {shape}.")
    row = context[:, 0, :]
    best = row.argmax(dim=-1)
    return torch.where(row.max(dim=-1).values > 0.5, best, torch.full_like(best, UNCONDITIONAL))


class OracleDiffusion(torch.nn.Module):
    """Diffusion module that answers with the mixture's exact E[x0 | x_sigma]."""

    def __init__(self, mixture, **_):
        super().__init__()
        self.mixture = mixture
        self.dtype = torch.float32
        self.owner = lambda: None  # set by build_oracle_model: the BaseModel, for its current model_sampling
        self._warned = False

    def exact_sigma(self, model_sampling, t, transformer_options, rows):
        """The sampler's sigma per row (the discrete EPS timestep is rounded; a shift is not invertible)."""
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:
            return model_sampling.sigma(t)
        sigmas = sigmas.to(t).repeat(rows // sigmas.shape[0])
        if not torch.allclose(model_sampling.timestep(sigmas).float(), t.float(), rtol=1e-4, atol=1e-3):
            if not self._warned:
                logging.warning("Stride oracle: transformer_options['sigmas'] disagrees with the timestep; "
                                "using the model's sigma(t)")
                self._warned = True
            return model_sampling.sigma(t)
        return sigmas

    def forward(self, x, timesteps, context=None, transformer_options={}, **kwargs):
        # DIFFUSION_MODEL wrappers (caches, counters) apply here as they do on ComfyUI's own networks.
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                            transformer_options)
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers)
        return executor.execute(x, timesteps, context, transformer_options, **kwargs)

    def _forward(self, x, timesteps, context=None, transformer_options={}, **kwargs):
        if tuple(x.shape[1:]) != (4, 8, 8):
            raise ValueError(f"The Stride oracle model works on [batch, 4, 8, 8] digits latents; got {list(x.shape)}. "
                             "Use the LATENT of the Stride demo model loader.")
        ms = self.owner().model_sampling
        sigma = self.exact_sigma(ms, timesteps, transformer_options, x.shape[0])
        one, zero = torch.ones_like(x), torch.zeros_like(x)
        x_noisy = x / ms.calculate_input(sigma, one)                 # undo the model's input scaling
        alpha = ms.noise_scaling(sigma, zero, one)                    # 1 for EPS, 1 - sigma for flow
        x0 = self.mixture.denoise(x_noisy, sigma, alpha[:, 0, 0, 0], labels_from_context(context).to(x.device))
        base = ms.calculate_denoised(sigma, zero, x_noisy)           # denoised = base + slope * output
        slope = ms.calculate_denoised(sigma, one, x_noisy) - base
        return (x0.to(x) - base) / slope


class OracleConfig(comfy.supported_models_base.BASE):
    """Model config: identity 4-channel latent format; the schedule comes from sampling_settings."""
    latent_format = comfy.latent_formats.LatentFormat
    memory_usage_factor = 0.01
    supported_inference_dtypes = [torch.float32]

    def __init__(self, sampling_settings):
        super().__init__({})
        self.sampling_settings = dict(sampling_settings)


def build_oracle_model(parameterization="eps", shift=1.0, zero_terminal_snr=False):
    """A ModelPatcher around the oracle: 'eps' (SD1.5 discrete schedule, optionally rescaled to zero
    terminal SNR) or 'flow' (CONST, SD3-style shift)."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {list(PARAMETERIZATIONS)}, got {parameterization!r}")
    if parameterization == "eps" and shift != 1.0:
        raise ValueError(f"shift={shift} is a flow-model option; the EPS oracle uses the SD1.5 discrete "
                         "schedule. Set shift to 1.0 or choose the flow oracle.")
    if parameterization == "flow" and zero_terminal_snr:
        raise ValueError("zero_terminal_snr is an EPS option (it rescales the SD1.5 discrete schedule); "
                         "a flow model already reaches pure noise at sigma = 1. Turn it off or choose the EPS oracle.")
    settings = {"shift": shift, "multiplier": 1000} if parameterization == "flow" else {"zsnr": zero_terminal_snr}
    mixture = load_mixture()
    model = comfy.model_base.BaseModel(OracleConfig(settings), model_type=PARAMETERIZATIONS[parameterization],
                                       device=torch.device("cpu"),
                                       unet_model=lambda **kw: OracleDiffusion(mixture, **kw))
    model.diffusion_model.owner = weakref.ref(model)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
