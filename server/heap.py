"""The objects a process made while it started, kept out of the garbage collector's way.

Importing torch, transformers and the tokenizer, and loading the model, leave
some 300,000 objects that live as long as the process. Every full collection
walks all of them: about 110 ms on the default model, with the GIL held, so the
engine thread and the event loop both stop. Allocating steps trigger one every
so often; one was measured in the middle of an adapter load (a 4 ms read took
140 ms). Frozen (Python's permanent generation), they are never walked again;
the collector then looks at what was made since start-up only.
"""
from __future__ import annotations

import atexit
import gc


def freeze_startup_objects() -> None:
    """Collect what start-up left unreachable, then freeze everything alive now.
    Call it once the model, engine and state are built, before serving."""
    gc.collect()
    gc.freeze()
    # thawed at exit, so that the interpreter's last collection frees them as it would have
    # (nanobind, under xgrammar, reports every instance still alive then as a leak)
    atexit.register(gc.unfreeze)
