"""Demo nodes: the embedded oracle model and the digits latent decoder (no download needed)."""
import torch

from comfy_api.latest import io

from ..demo.digits import LATENT_SHAPE, decode
from . import neural_models
from .compat import EXPERT
from .oracle_model import build_oracle_model, digit_conditioning, load_mixture

ORACLES = {"oracle_eps": "eps", "oracle_flow": "flow"}
MODELS = [*ORACLES, *neural_models.SPECS]
OWN, LARGE_SIBLINGS = "own", "large sibling's"
CONDITIONINGS = [OWN, LARGE_SIBLINGS]


def parse_digits(digits):
    text = digits.replace(",", "").replace(" ", "")
    if not text or not text.isdigit():
        raise ValueError(f"digits must list digits 0-9, like '7' or '0123456789'; got {digits!r}")
    return [int(c) for c in text]


def load_demo_model(model, labels, shift, zero_terminal_snr, conditioning=OWN):
    """(ModelPatcher, positive, negative) for a demo model and digit labels. With conditioning "large sibling's",
    a small network re-expressed to take its large sibling's conditioning, and that conditioning (for T-Stitch)."""
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {CONDITIONINGS}; got {conditioning!r}")
    if conditioning == LARGE_SIBLINGS and not (model in neural_models.SPECS and model.endswith("_small")):
        raise ValueError(f"conditioning \"{LARGE_SIBLINGS}\" applies to small models only (unet_small, dit_small), "
                         f"to stitch them with their large sibling; {model} has no large sibling to adopt "
                         "the conditioning of (use \"own\")")
    if model in ORACLES:
        patcher = build_oracle_model(ORACLES[model], shift, zero_terminal_snr)
        return patcher, digit_conditioning(labels), digit_conditioning([-1])
    if shift != 1.0 or zero_terminal_snr:
        raise ValueError(f"shift and zero_terminal_snr are options of the oracle models; {model} keeps the "
                         "schedule it was trained with (use ComfyUI's ModelSampling nodes to change it)")
    patcher, embedding = neural_models.load_model(model)
    if conditioning == LARGE_SIBLINGS:
        large = model[:-len("_small")] + "_large"
        patcher = neural_models.adopt_conditioning(patcher, model, large)
        embedding = neural_models.load_embedding(large)
    return patcher, embedding.conditioning(labels), embedding.conditioning([neural_models.NULL_LABEL])


class StrideDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideDemoModel",
            display_name="Demo model loader (Stride)",
            category="sampling/stride/demo",
            description="Loads one of Stride's embedded demo models, no download needed, all on 8x8 digits: an "
                        "exact Gaussian-mixture oracle whose denoiser is analytic (so every sampler can be checked "
                        "against the true answer), or a small trained network of ComfyUI's own architectures "
                        "(SD1.5-style UNet, Flux-style DiT). Outputs the model, the conditioning for the chosen "
                        "digits, the unconditional (negative) conditioning and an empty latent.",
            inputs=[
                io.Combo.Input("model", options=MODELS, default="oracle_eps",
                               tooltip="oracle_eps / oracle_flow: the exact oracle, EPS with the SD1.5 discrete "
                                       "schedule or rectified flow (CONST, like SD3, Flux, Wan). unet_large / "
                                       "unet_small: trained SD1.5-style UNets (EPS). dit_large / dit_small: trained "
                                       "Flux-style DiTs (rectified flow). Each small model is several times "
                                       "cheaper per evaluation than its large twin."),
                io.String.Input("digits", default="0123456789",
                                tooltip="Which digits to draw, one image per digit and per repeat, e.g. '7' or '0123456789'."),
                io.Int.Input("repeats", default=1, min=1, max=64,
                             tooltip="How many images of each listed digit (the batch is digits x repeats)."),
                io.Float.Input("shift", **EXPERT, default=1.0, min=0.01, max=100.0, step=0.01,
                               tooltip="oracle_flow only: the SD3-style time shift of the schedule (1 = none)."),
                io.Boolean.Input("zero_terminal_snr", **EXPERT, default=False,
                                 tooltip="oracle_eps only: rescale the SD1.5 schedule to zero terminal SNR "
                                         "(like ModelSamplingDiscrete's zsnr), so sampling starts from pure noise."),
                io.Combo.Input("conditioning", **EXPERT, options=CONDITIONINGS, default=OWN, optional=True,
                               tooltip="unet_small / dit_small only, for stitching the small model with its large "
                                       "sibling (T-Stitch), where one conditioning feeds both models. own: the "
                                       "model's own digit embedding. large sibling's: the small model re-expressed, "
                                       "exactly and without training, to take the large model's conditioning; "
                                       "outputs that conditioning, so the positive/negative of either loader feed "
                                       "both models."),
            ],
            outputs=[
                io.Model.Output(tooltip="The demo model."),
                io.Conditioning.Output(display_name="positive", tooltip="Selects the listed digits."),
                io.Conditioning.Output(display_name="negative", tooltip="Unconditional: all digits."),
                io.Latent.Output(tooltip="An empty [batch, 4, 8, 8] digits latent."),
            ],
        )

    @classmethod
    def execute(cls, model, digits, repeats, shift, zero_terminal_snr=False, conditioning=OWN):
        labels = [d for d in parse_digits(digits) for _ in range(repeats)]
        patcher, positive, negative = load_demo_model(model, labels, shift, zero_terminal_snr, conditioning)
        latent = {"samples": torch.zeros(len(labels), *LATENT_SHAPE)}
        return io.NodeOutput(patcher, positive, negative, latent)


class StrideDigitsDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StrideDigitsDecode",
            display_name="Decode digits latent (Stride)",
            category="sampling/stride/demo",
            description="Turns a [batch, 4, 8, 8] digits latent into images, exactly (depth-to-space).",
            inputs=[
                io.Latent.Input("samples", tooltip="A digits latent from a sampler run on the Stride demo model."),
                io.Int.Input("scale", default=8, min=1, max=64,
                             tooltip="Nearest-neighbour enlargement of the 16x16 digits, for viewing."),
            ],
            outputs=[io.Image.Output(tooltip="The digits as images, white on black.")],
        )

    @classmethod
    def execute(cls, samples, scale):
        mixture = load_mixture()
        grey = decode(samples["samples"].cpu().double(), mixture.latent_mean.cpu(), mixture.latent_std.cpu())
        grey = grey.clamp(0, 1).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        return io.NodeOutput(grey.float().unsqueeze(-1).expand(-1, -1, -1, 3).contiguous())


NODES = [StrideDemoModel, StrideDigitsDecode]
