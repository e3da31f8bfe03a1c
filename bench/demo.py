"""The demo (`make demo`): run Stride's example workflows headless on the demo models (the exact oracle and
the trained networks), with several ComfyUI samplers and step counts; write an image grid per model and the
error table (against x_ref: the oracle's exact answer, or the network's own ODE solved tightly) to out/demo/.

    .venv/bin/python -m bench.demo [--quick]
"""
import os
import time

from PIL import Image, ImageDraw
from safetensors.torch import load_file

from . import host
from .common import ModelSetup, parser, write_json
from .reference import error_vs_reference
from .workflow import load_example, ui_to_api

OUT = os.path.join(host.REPO, "out", "demo")
# example workflow -> the demo models it is run with (its own first; the trained pairs run both sizes)
WORKFLOWS = {"stride_demo_oracle": ["oracle_eps"], "stride_demo_oracle_flow": ["oracle_flow"],
             "stride_demo_unet": ["unet_large", "unet_small"], "stride_demo_dit": ["dit_large", "dit_small"]}
SAMPLERS = ["euler", "heun", "dpmpp_2m", "uni_pc", "deis"]
STEPS = [4, 6, 10, 20]
CELL = 2  # pixel enlargement of each 16x16 digit in the grid


def node_of(prompt, class_type):
    return next(n for n in prompt.values() if n["class_type"] == class_type)


def run(prompt, sampler, steps):
    """Execute the workflow (plus a SaveLatent) with ComfyUI's PromptExecutor; returns (latent, images)."""
    prompt = {k: {**v, "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    ksampler_id = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    prompt[ksampler_id]["inputs"].update(sampler_name=sampler, steps=steps)
    prompt["stride_latent"] = {"class_type": "SaveLatent",
                               "inputs": {"samples": [ksampler_id, 0], "filename_prefix": f"demo_{sampler}_{steps}"}}
    outputs = host.run_prompt(prompt)
    import folder_paths
    out_dir = folder_paths.get_output_directory()
    path = lambda item: os.path.join(out_dir, item["subfolder"], item["filename"])
    latent = load_file(path(outputs["stride_latent"]["latents"][0]))["latent_tensor"]
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    images = [Image.open(path(item)).convert("L") for item in outputs[save_id]["images"]]
    return latent, images


def strip(images):
    """Digits side by side, each 16x16 enlarged CELL times."""
    side = 16 * CELL
    row = Image.new("L", (side * len(images), side))
    for i, im in enumerate(images):
        row.paste(im.resize((side, side), Image.NEAREST), (i * side, 0))
    return row


def grid(rows, columns, title):
    """rows: [(label, {column: strip image})] -> one labelled PNG."""
    label_w, head_h, pad = 150, 28, 6
    cell_w = max(im.width for _, cells in rows for im in cells.values()) + pad
    cell_h = 16 * CELL + pad
    canvas = Image.new("L", (label_w + cell_w * len(columns), head_h + cell_h * len(rows)), 40)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=255)
    for j, col in enumerate(columns):
        draw.text((label_w + j * cell_w, 14), f"{col} steps", fill=255)
    for i, (label, cells) in enumerate(rows):
        y = head_h + i * cell_h
        draw.text((4, y + 10), label, fill=255)
        for j, col in enumerate(columns):
            if col in cells:
                canvas.paste(cells[col], (label_w + j * cell_w, y))
    return canvas


def decode_images(mixture, latent):
    digits = host.stride("demo.digits")
    grey = digits.decode(latent.double(), mixture.latent_mean, mixture.latent_std).clamp(0, 1)
    return [Image.fromarray((g * 255).round().byte().numpy(), "L") for g in grey]


def main():
    args = parser(__doc__.splitlines()[0]).parse_args()
    samplers, steps_list = (SAMPLERS[:3], STEPS[::2]) if args.quick else (SAMPLERS, STEPS)
    os.makedirs(OUT, exist_ok=True)
    host.boot(base_dir=os.path.join(OUT, "comfyui"))
    mixture = host.stride("nodes.demo").load_mixture()
    start = time.perf_counter()
    table = ["| model | sampler | " + " | ".join(f"{s} steps" for s in steps_list) + " |",
             "|---|---|" + "---|" * len(steps_list)]
    results = []
    for workflow, model_name in [(w, m) for w, models in WORKFLOWS.items() for m in models]:
        prompt = ui_to_api(load_example(workflow))
        loader, ksampler = node_of(prompt, "StrideDemoModel")["inputs"], node_of(prompt, "KSampler")["inputs"]
        loader["model"] = model_name
        labels = [int(c) for c in loader["digits"] for _ in range(loader["repeats"])]
        setup = ModelSetup(model_name, [ksampler["seed"]], labels, loader["shift"])
        rtol = 1e-8 if setup.is_oracle else 1e-5
        x_ref = setup.reference(float(setup.model_sampling.sigma_max), ksampler["cfg"], rtol)
        ref_label = "exact (x_ref)" if setup.is_oracle else "reference ODE"
        rows = [(ref_label, {steps_list[0]: strip(decode_images(mixture, x_ref))})]
        for sampler in samplers:
            cells, errors = {}, []
            for steps in steps_list:
                latent, images = run(prompt, sampler, steps)
                err = error_vs_reference(latent, x_ref, mixture.data_std()).mean().item()
                cells[steps] = strip(images)
                errors.append(f"{err:.3g}")
                results.append({"model": model_name, "sampler": sampler, "steps": steps, "error": err})
            rows.append((f"{sampler}", cells))
            table.append(f"| {model_name} | {sampler} | " + " | ".join(errors) + " |")
        title = f"{model_name}, {ksampler['scheduler']} schedule, cfg {ksampler['cfg']}, seed {ksampler['seed']}"
        grid(rows, steps_list, title).save(os.path.join(OUT, f"grid_{model_name}.png"))
    errors_md = "Mean per-image error vs x_ref, in data standard deviations:\n\n" + "\n".join(table) + "\n"
    with open(os.path.join(OUT, "errors.md"), "w") as f:
        f.write(errors_md)
    print("\n" + errors_md)
    print(f"Ran {len(results)} workflows in {time.perf_counter() - start:.1f} s. Wrote:")
    for name in sorted(os.listdir(OUT)):
        if name.endswith((".png", ".md")):
            print("  " + os.path.join(OUT, name))
    print(f"  {os.path.join(OUT, 'comfyui', 'output')}  (the images saved by the workflows' SaveImage nodes)")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
