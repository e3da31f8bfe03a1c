"""Test-only node, loaded by the test harness with ComfyUI's loader: keeps a LATENT or IMAGE for the test."""


class StrideTestCapture:
    captured = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "out"})},
                "optional": {"latent": ("LATENT",), "image": ("IMAGE",)}}

    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def capture(self, key, latent=None, image=None):
        self.captured[key] = latent["samples"].clone() if latent is not None else image.clone()
        return {}


NODE_CLASS_MAPPINGS = {"StrideTestCapture": StrideTestCapture}
