"""CUDA's caching allocator in expandable segments, so that a memory plan's peak is what the GPU must hold.

`minilora.memory_policy` plans activations to a budget of *allocated* bytes (what `torch.cuda.max_memory_allocated`
reports, and what the peers report as peak memory). The default allocator keeps freed blocks in fixed segments and
can only reuse a block of the size asked for, so a step that allocates and frees tensors of many sizes (checkpoint
offload, chunked MLP and loss) leaves holes: its reserved memory runs well above allocated, and a GPU that holds
exactly the planned peak runs out. Expandable segments map physical pages into one growing virtual range per
stream, so the holes close up.

Measured (issue 6, one H200 call, the allocator capped with torch.cuda.set_per_process_memory_fraction):
the 8B shape at 1 x 32768 planned to 13.58 GiB under a 14 GiB cap ran out of memory with the default allocator
(0.9 GiB reserved but not allocated; a 13 GiB plan, 1.7 GiB), and trained with expandable segments (peak 13.46
allocated, 14.00 reserved, 7,693 tok/s). Uncapped, in the same call as the default allocator: 16,999 against
16,658 tok/s at 8B 2 x 2048 (CUDA graphs on), 81,683 against 81,159 at 1B.

The scripts call `prefer_expandable_segments` before they import torch: torch may read the variable as soon as it
loads, and never reads it again once the allocator has started. Library users set it themselves.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

EXPANDABLE = "expandable_segments:True"
# every torch this runs on reads PYTORCH_CUDA_ALLOC_CONF (2.11 on the H200, without a warning); newer ones (2.13) also
# read PYTORCH_ALLOC_CONF, for every device
_NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def prefer_expandable_segments(environ: MutableMapping[str, str] = os.environ) -> str:
    """Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless an allocator setting is there already (the user's
    own wins, whole); returns the setting in effect. Imports nothing, so it can run before `import torch`."""
    for name in _NAMES:
        if environ.get(name):
            return environ[name]
    environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE
    return EXPANDABLE
