"""Which LoRA path serves a runner: the tests that compare both paths with
PEFT also check that the path they name is the one that ran."""
from __future__ import annotations


def forbid_other_lora_path(monkeypatch, path: str) -> None:
    """Call after the runner is built: make the LoRA path that `path`
    ("torch" or "triton") does not name raise, and flip LORAMUX_TRITON. The
    runner's backend was chosen once, at construction, so neither may change
    which path serves."""
    from loramux.kernels import cpu, sgmv

    def wrong(*args, **kwargs):
        raise AssertionError(f"the runner was built for the {path} LoRA path; another one ran")

    other = [(sgmv, "lora_shrink"), (sgmv, "lora_expand")]
    if path == "triton":
        other = [(cpu, "apply_lora"), (cpu, "lora_shrink"), (cpu, "lora_expand")]
    for module, name in other:
        monkeypatch.setattr(module, name, wrong)
    monkeypatch.setenv("LORAMUX_TRITON", "0" if path == "triton" else "1")
