"""Which LoRA path serves a runner: the tests that compare the paths with
PEFT also check that the path they name is the one that ran.

    torch      torch's ops on a CPU (LORAMUX_CPU_OPS=0): attention and LoRA
    compiled   the compiled CPU ops (kernels/cpu_ext.py), which must build here
    triton     the Triton kernels (CUDA, or the interpreter on a CPU)
"""
from __future__ import annotations

PATHS = ["torch", "compiled", "triton"]


def choose_path(monkeypatch, path: str) -> None:
    """Set the environment the runner's choices read, before it is built."""
    monkeypatch.setenv("LORAMUX_TRITON", "1" if path == "triton" else "0")
    monkeypatch.setenv("LORAMUX_CPU_OPS", "0" if path == "torch" else "1")


def assert_runner_path(runner, path: str) -> None:
    """The runner's LoRA backend, its model's decode attention, small-batch GEMMs, norms and rotary are
    `path`'s."""
    from loramux.server.model.lora_backend import CpuLoraBackend, TritonLoraBackend

    assert isinstance(runner.lora, TritonLoraBackend if path == "triton" else CpuLoraBackend)
    assert runner.lora.path == path
    # the small-batch GEMMs, norms and rotary are the compiled ops wherever the model is on a CPU and
    # the ops are allowed
    cpu = "compiled" if path != "torch" and runner.model.device.type == "cpu" else "torch"
    lora = path if path == "triton" else f"{path} (long segments: {runner.lora.long_segments})"
    assert runner.kernel_paths() == (f"decode attention: {path}, LoRA deltas: {lora}, small-batch GEMMs: {cpu}, "
                                     f"norms and rotary: {cpu}")


def forbid_other_lora_path(monkeypatch, path: str) -> None:
    """Call after the runner is built: make the LoRA path that `path`
    ("torch", "compiled" or "triton") does not name raise, and flip LORAMUX_TRITON. The
    runner's backend was chosen once, at construction, so neither may change
    which path serves."""
    from loramux.kernels import cpu, sgmv

    def wrong(*args, **kwargs):
        raise AssertionError(f"the runner was built for the {path} LoRA path; another one ran")

    other = [(sgmv, "lora_shrink"), (sgmv, "lora_expand")]
    if path == "torch":
        other.append((cpu, "apply_lora_compiled"))
    if path == "triton":
        other = [(cpu, "apply_lora"), (cpu, "lora_shrink"), (cpu, "lora_expand")]
    for module, name in other:
        monkeypatch.setattr(module, name, wrong)
    monkeypatch.setenv("LORAMUX_TRITON", "0" if path == "triton" else "1")
