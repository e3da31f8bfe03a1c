"""Bridge: per-run state for Stride's stateful wrappers, safe when ComfyUI calls a model from several threads.

ComfyUI's multi-GPU work units call APPLY_MODEL wrappers (and the block and attention replacements inside a call)
from worker threads on per-device clones, and two threads may sample one patched model at once. So no wrapper
keeps its run's state on itself: the OUTER_SAMPLE wrapper makes a fresh state for each run and puts it in that run's
transformer_options (the guider's per-run copy of the model options), where every call of the run, in whichever
thread, finds it. The state carries a lock for what calls of one run update together.
"""
import logging
import threading


class Run:
    """The state of one sampling run: attributes as the wrapper likes, and `lock`."""

    def __init__(self, **fields):
        self.lock = threading.Lock()
        self.__dict__.update(fields)


class PerRun:
    """OUTER_SAMPLE wrapper `outer` (new(options) -> Run at the start, finish(run) at the end) and `find` for the
    calls of the run."""

    def __init__(self, key, new, finish=None):
        self.key = f"{key}#{id(self)}"  # two patches of one kind on a model keep two states
        self.new, self.finish = new, finish
        self._warned = False

    def outer(self, executor, *args, **kwargs):
        options = executor.class_obj.model_options.setdefault("transformer_options", {})
        run = options[self.key] = self.new(options)
        try:
            return executor(*args, **kwargs)
        finally:
            options.pop(self.key, None)
            if self.finish is not None:
                self.finish(run)

    def find(self, transformer_options, what):
        """The run a call belongs to; None (logged once) for a call outside any sampling run of this model."""
        run = (transformer_options or {}).get(self.key)
        if run is None and not self._warned:
            self._warned = True
            logging.warning("Stride %s: a model call outside a sampling run of this model; it runs unchanged", what)
        return run
