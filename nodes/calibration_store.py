"""The calibration store: one-time measurements on the user's model (optimized schedules and their cost
matrices, solver statistics, cache plans) kept as safetensors under ComfyUI's models folder, with the settings
and a model fingerprint in the metadata. A file made for another model, other settings or an older format is
reported and never silently used."""
import hashlib
import json
import logging
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import folder_paths

FOLDER = "stride_calibrations"
VERSION = 1
SAMPLED_TENSORS = 24   # weights hashed: this many tensors, evenly spread over the sorted state dict
SAMPLED_VALUES = 256   # and this many values spread over each


def register():
    """Register models/stride_calibrations (more paths can come from extra_model_paths.yaml)."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)],
                                                       {".safetensors"})


def _digest(parts):
    h = hashlib.sha256()
    for part in parts:
        if torch.is_tensor(part):
            flat = part.detach().flatten()
            # float32 positions (as stored fingerprints were made); past 2**24 values they round up to numel()
            idx = torch.linspace(0, max(flat.numel() - 1, 0), min(SAMPLED_VALUES, flat.numel())).long()
            idx = idx.clamp_(max=max(flat.numel() - 1, 0))
            h.update(repr(tuple(part.shape)).encode())
            h.update(flat[idx].to(torch.float32).cpu().numpy().tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _patch_parts(value):
    """The hashable parts of a weight patch (LoRA and others): numbers, strings and sampled tensors."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _patch_parts(v)]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return [value]
    return [type(value).__name__]


def fingerprint(model):
    """A cheap identity of a ModelPatcher: model class, parameterization and noise schedule, a hash of a fixed
    sample of weights, and the patches applied on top (weight patches such as LoRA with their strengths,
    object patches, replaced blocks). {"id": short hash of all, and each part}."""
    base = model.model
    ms = model.get_model_object("model_sampling")
    sampling = [type(ms).__name__, round(float(ms.sigma_min), 6), round(float(ms.sigma_max), 6)]
    sampling += [round(float(getattr(ms, k)), 6) for k in ("shift", "multiplier") if hasattr(ms, k)]
    state = base.diffusion_model.state_dict()
    keys = sorted(state)
    picked = [keys[int(i)] for i in torch.linspace(0, len(keys) - 1, min(SAMPLED_TENSORS, len(keys))).long()]
    parts = {
        "class": type(base).__name__ + "/" + type(base.diffusion_model).__name__,
        "prediction": getattr(getattr(base, "model_type", None), "name", "?"),
        "sampling": repr(sampling),
        "weights": _digest([len(keys)] + [p for k in picked for p in (k, state[k])]),
        "patches": _digest([p for k in sorted(model.patches) for p in [k] + _patch_parts(model.patches[k])]
                           + sorted(model.object_patches)
                           + sorted(model.model_options.get("transformer_options", {}).get("patches_replace", {}))),
    }
    return {"id": _digest([parts[k] for k in sorted(parts)])[:12], **parts}


def _settings_id(method, settings):
    return _digest([method, json.dumps(settings, sort_keys=True)])[:10]


def file_name(method, settings, fp):
    return f"{method}-{fp['id']}-{_settings_id(method, settings)}.safetensors"


def save(method, settings, fp, tensors, info=None):
    """Write a calibration; returns its path. tensors: {name: tensor}; info: small JSON-able results."""
    register()
    folder = folder_paths.get_folder_paths(FOLDER)[0]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, file_name(method, settings, fp))
    meta = {"version": VERSION, "method": method, "settings": settings, "fingerprint": fp, "info": info or {}}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path,
              metadata={"stride": json.dumps(meta)})
    logging.info("Stride calibration: saved %s", path)
    return path


def read(path, tensors=True):
    """(tensors, metadata) of a calibration file; tensors=False reads the metadata alone (tensors is then {})."""
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("stride", "{}"))
        return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {}), meta


def paths(method):
    """The stored files of a method, in every calibration folder."""
    register()
    for folder in folder_paths.get_folder_paths(FOLDER):
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.startswith(method + "-") and name.endswith(".safetensors"):
                    yield os.path.join(folder, name)


def find(method, settings, fp):
    """(tensors, metadata, path) of the stored calibration for these settings and this model, or None. Files
    for the same method and settings made for another model, or in an older format, are logged with the
    reason they are not used."""
    want = _settings_id(method, settings)
    for path in paths(method):
        if not path.endswith(f"-{want}.safetensors"):
            continue
        try:
            _, meta = read(path, tensors=False)
        except Exception as e:  # a damaged file is reported and skipped, never fatal
            logging.warning("Stride calibration: cannot read %s (%s); ignoring it", path, e)
            continue
        if meta.get("version") != VERSION:
            logging.warning("Stride calibration: %s is stale (format %s, this Stride reads %s); recalibrating",
                            path, meta.get("version"), VERSION)
            continue
        if meta.get("settings") != settings:
            continue
        diff = mismatch(meta.get("fingerprint", {}), fp)
        if diff:
            logging.info("Stride calibration: %s has these settings but was made for another model (%s differ); "
                         "not used", path, diff)
            continue
        return read(path)[0], meta, path  # the tensors of the one file that fits
    return None


def mismatch(stored, fp):
    """The fingerprint parts that differ ('' when the model matches)."""
    return ", ".join(k for k in fp if k != "id" and stored.get(k) != fp[k])


def parse_text(text, key, version, label, name, redo="recalibrate"):
    """The dict of a Stride text (a calibration, plan or Autotune result: one line of JSON tagged {key: version}),
    with a clear error for text that is not JSON or not of this version."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"Stride {label}: the {name} text is not valid JSON ({e}); paste the text the node wrote") \
            from None
    got = data.get(key) if isinstance(data, dict) else None
    if got != version:
        raise ValueError(f"Stride {label}: not a Stride {name} of this version ({got!r}, expected {version}); {redo}")
    return data

