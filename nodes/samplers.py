"""SAMPLER nodes: one per Stride method, for SamplerCustom / SamplerCustomAdvanced."""
from comfy_api.latest import io

from ..samplers import flow, momentum, multistep
from .sampler_bridge import DUALFAST_STRENGTH, TIME_SHIFT, sampler_object

CATEGORY = "sampling/stride/samplers"
BASES = {  # base solver choices of the plug-in nodes: (function, options)
    "ddim": (multistep.sample_ddim, {}),
    "dpmpp_2m": (multistep.sample_dpmpp, {"order": 2}),
    "dpmpp_3m": (multistep.sample_dpmpp, {"order": 3}),
    "unipc_bh1": (multistep.sample_unipc, {"variant": "bh1"}),
    "unipc_bh2": (multistep.sample_unipc, {"variant": "bh2"}),
}
LAMBDA_TIP = ("(expert) Which half-log-SNR the solver steps in. 'model': log(alpha/sigma) of the model's own "
              "parameterization (right for flow models). 've': -log(sigma) whatever the model, which is what "
              "ComfyUI's dpmpp_2m and uni_pc do on flow models too; use it to reproduce them exactly.")


def _schema(node_id, display_name, description, inputs):
    return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                     inputs=inputs, outputs=[io.Sampler.Output()])


def _base_input(default="dpmpp_2m"):
    return io.Combo.Input("base", options=list(BASES), default=default,
                          tooltip="The solver the plug-in modifies: DDIM (first order), DPM-Solver++ 2M / 3M, or "
                                  "UniPC (order 3, bh1 or bh2).")


def _lambda_input():
    return io.Combo.Input("half_log_snr", options=["model", "ve"], default="model", tooltip=LAMBDA_TIP)


class StrideSamplerDPMPP(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("StrideSamplerDPMPP", "DPM-Solver++ sampler (Stride)",
                       "DPM-Solver++ multistep in data prediction (Lu et al. 2022), written once for EPS and flow "
                       "models: order 1 is DDIM, 2 is 2M, 3 is 3M. One model call per step.", [
                           io.Int.Input("order", default=2, min=1, max=3,
                                        tooltip="1 = DDIM, 2 = DPM-Solver++(2M), 3 = DPM-Solver++(3M). 2 is the safe "
                                                "choice with strong guidance."),
                           _lambda_input()])

    @classmethod
    def execute(cls, order, half_log_snr) -> io.NodeOutput:
        return io.NodeOutput(sampler_object(multistep.sample_dpmpp, "dpmpp",
                                            {"order": order, "param": half_log_snr}))


class StrideSamplerUniPC(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("StrideSamplerUniPC", "UniPC sampler (Stride)",
                       "UniPC (Zhao et al. 2023): a multistep predictor with a corrector that reuses the next model "
                       "output, so the corrector costs no extra model call. Ends with a true final denoise.", [
                           io.Int.Input("order", default=3, min=1, max=3, tooltip="Predictor order (1-3)."),
                           io.Combo.Input("variant", options=list(multistep.UNIPC_VARIANTS), default="bh1",
                                          tooltip="B(h) = h (bh1, often better unconditionally at few steps) or "
                                                  "e^h - 1 (bh2, recommended with guidance)."),
                           io.Boolean.Input("corrector", default=True,
                                            tooltip="(expert) Use the UniC corrector; off gives the plain UniP "
                                                    "predictor."),
                           io.Boolean.Input("lower_order_final", default=True,
                                            tooltip="(expert) Lower the order over the last steps (more stable at "
                                                    "few steps)."),
                           _lambda_input()])

    @classmethod
    def execute(cls, order, variant, corrector, lower_order_final, half_log_snr) -> io.NodeOutput:
        return io.NodeOutput(sampler_object(multistep.sample_unipc, "unipc", {
            "order": order, "variant": variant, "corrector": corrector, "lower_order_final": lower_order_final,
            "param": half_log_snr}))


class StrideSamplerDualFast(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("StrideSamplerDualFast", "DualFast sampler (Stride)",
                       "DualFast (Yu et al. 2025) on DDIM, DPM-Solver++ or UniPC: the first-order term extrapolates "
                       "the noise prediction away from an earlier, noisier one, to cut the network's approximation "
                       "error. No extra model calls.", [
                           _base_input(),
                           io.Float.Input("strength", default=DUALFAST_STRENGTH, min=0.0, max=2.0, step=0.05,
                                          tooltip="The extrapolation weight at the last step; it grows linearly from "
                                                  "0 at the first step. 0 = the base solver."),
                           io.Combo.Input("reference", options=["previous", "first"], default="previous",
                                          tooltip="(expert) The noisier prediction to extrapolate from: the previous "
                                                  "step's or the first step's.")])

    @classmethod
    def execute(cls, base, strength, reference) -> io.NodeOutput:
        fn, options = BASES[base]
        return io.NodeOutput(sampler_object(fn, "dualfast", {**options, "dualfast": strength,
                                                             "dualfast_ref": reference}))


class StrideSamplerHeavyBall(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("StrideSamplerHeavyBall", "Heavy-Ball momentum sampler (Stride)",
                       "Heavy-Ball momentum (Wizadwongsa et al. 2024) on DPM-Solver++(2M) or on PLMS: averages the "
                       "update direction over steps, which damps the divergence artifacts of few steps with strong "
                       "guidance. No extra model calls.", [
                           io.Combo.Input("base", options=["dpmpp_2m", "plms"], default="dpmpp_2m",
                                          tooltip="DPM-Solver++(2M) (momentum on its data prediction) or PLMS "
                                                  "(momentum on its Adams-Bashforth slope)."),
                           io.Float.Input("beta", default=0.8, min=0.05, max=1.0, step=0.05,
                                          tooltip="Momentum weight of the newest direction; 1 = no momentum. The "
                                                  "paper uses 0.8-0.9."),
                           io.Int.Input("plms_order", default=4, min=1, max=4,
                                        tooltip="PLMS only: the Adams-Bashforth order (1-4).")])

    @classmethod
    def execute(cls, base, beta, plms_order) -> io.NodeOutput:
        if base == "plms":
            return io.NodeOutput(sampler_object(momentum.sample_plms_hb, "plms_hb", {"order": plms_order, "beta": beta}))
        return io.NodeOutput(sampler_object(multistep.sample_dpmpp, "dpmpp_2m_hb", {"order": 2, "beta": beta}))


class StrideSamplerGHVB(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("StrideSamplerGHVB", "GHVB momentum sampler (Stride)",
                       "Generalized Heavy Ball (Wizadwongsa et al. 2024): a multistep method of fractional order "
                       "between Heavy-Ball Euler and PLMS-4. No extra model calls.", [
                           io.Float.Input("order", default=2.5, min=0.1, max=4.0, step=0.1,
                                          tooltip="Fractional order q: ceil(q) velocities, momentum q - floor(q). "
                                                  "Integer q is plain PLMS of that order; lower q damps more.")])

    @classmethod
    def execute(cls, order) -> io.NodeOutput:
        return io.NodeOutput(sampler_object(momentum.sample_ghvb, "ghvb", {"order": order}))


class StrideSamplerTimeShift(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("StrideSamplerTimeShift", "Time-Shift sampler (Stride)",
                       "Time-Shift sampler (Li et al. 2024) on DDIM, DPM-Solver++ or UniPC: after each step each "
                       "image gets the noise level that matches its measured variance (signal term included, for "
                       "latents and flow models), searched near the scheduled one. No extra model calls.", [
                           _base_input(),
                           io.Float.Input("window", default=TIME_SHIFT["window"], min=0.01, max=1.0, step=0.01,
                                          tooltip="Search window around the scheduled noise level, as a fraction of "
                                                  "the step (in log-SNR)."),
                           io.Float.Input("cutoff", default=TIME_SHIFT["cutoff"], min=0.0, max=1.0, step=0.05,
                                          tooltip="Shift only during this first fraction of the steps.")])

    @classmethod
    def execute(cls, base, window, cutoff) -> io.NodeOutput:
        fn, options = BASES[base]
        return io.NodeOutput(sampler_object(fn, "time_shift", {**options, "time_shift": {"window": window,
                                                                                          "cutoff": cutoff}}))


class StrideSamplerFlowTurbo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("StrideSamplerFlowTurbo", "FlowTurbo sampler (Stride)",
                       "FlowTurbo's pseudo-corrector (Zhao et al. 2024), training-free part: Heun steps first, then "
                       "Heun-like steps that reuse the last slope, at one model call per step. Model calls: "
                       "steps + heun_steps (the final denoise is one call).", [
                           io.Int.Input("heun_steps", default=2, min=1, max=200,
                                        tooltip="How many full Heun steps (2 model calls each) come first.")])

    @classmethod
    def execute(cls, heun_steps) -> io.NodeOutput:
        return io.NodeOutput(sampler_object(flow.sample_flowturbo, "flowturbo", {"heun_steps": heun_steps}))


class StrideSamplerMixedSDE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("StrideSamplerMixedSDE", "Mixed ODE/SDE sampler (Stride)",
                       "Stochastic steps only inside a window of the schedule, deterministic Euler steps elsewhere "
                       "(the scheme of MixGRPO), with the reverse SDE that keeps the model's marginals. Noise comes "
                       "from ComfyUI's seed.", [
                           io.Float.Input("eta", default=0.7, min=0.0, max=5.0, step=0.05,
                                          tooltip="Noise strength of the SDE steps (0 = all ODE)."),
                           io.Float.Input("window_start", default=0.0, min=0.0, max=1.0, step=0.05,
                                          tooltip="Where the SDE window starts, as a fraction of the steps."),
                           io.Float.Input("window_end", default=0.3, min=0.0, max=1.0, step=0.05,
                                          tooltip="Where the SDE window ends, as a fraction of the steps (must "
                                                  "exceed window_start).")])

    @classmethod
    def execute(cls, eta, window_start, window_end) -> io.NodeOutput:
        if not window_start < window_end:
            raise ValueError(f"Stride mixed SDE: window_end ({window_end}) must exceed window_start ({window_start})")
        return io.NodeOutput(sampler_object(flow.sample_mixed_sde, "mixed_sde",
                                            {"eta": eta, "window": (window_start, window_end)}))


NODES = [StrideSamplerDPMPP, StrideSamplerUniPC, StrideSamplerDualFast, StrideSamplerHeavyBall, StrideSamplerGHVB,
         StrideSamplerTimeShift, StrideSamplerFlowTurbo, StrideSamplerMixedSDE]
