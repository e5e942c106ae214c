"""loramux: one base LLM, many LoRA adapters, one batch.

`from loramux.server import LLM` is the offline API. It is imported lazily so that
the plain-Python parts (scheduler, block allocator) load without torch.
"""

__all__ = ["LLM"]


def __getattr__(name):
    if name == "LLM":
        from loramux.server.llm import LLM

        return LLM
    raise AttributeError(name)
