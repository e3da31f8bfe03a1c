"""A memoising denoiser for searches that rerun a sampler many times: identical (x, sigma) inputs, as the
shared prefix of two runs produces bit for bit, are answered from the cache instead of the model."""
import hashlib

import torch


class Memo:
    def __init__(self, denoiser):
        self.denoiser, self.cache, self.hits = denoiser, {}, 0

    @staticmethod
    def _key(x, sigma, kwargs):
        h = hashlib.sha1()
        for t in (x, sigma):
            t = torch.as_tensor(t).detach().contiguous().cpu()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.numpy().tobytes())
        h.update(repr(sorted(kwargs)).encode())
        return h.hexdigest()

    def __call__(self, x, sigma, **kwargs):
        key = self._key(x, sigma, kwargs)
        if key in self.cache:
            self.hits += 1
            return self.cache[key]
        out = self.denoiser(x, sigma, **kwargs)
        self.cache[key] = out
        return out

    def __getattr__(self, name):  # e.g. inner_model, which Stride's ComfyUI samplers read
        return getattr(self.__dict__["denoiser"], name)
