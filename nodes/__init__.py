"""ComfyUI adapters: thin nodes that read ComfyUI objects and call Stride's math."""
from . import accel, autotune, bespoke, calibrated, compare, demo, guidance, samplers, schedules, structural

NODES = [*demo.NODES, *samplers.NODES, *guidance.NODES, *compare.NODES, *schedules.NODES, *calibrated.NODES,
         *structural.NODES, *accel.NODES, *bespoke.NODES, *autotune.NODES]
