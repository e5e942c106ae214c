"""Frozen configuration, validated once and passed downward.

ModelConfig describes the base model (read from an HF config); EngineConfig
holds the serving knobs. Components copy what they need from them.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

# The seven LoRA-able linears, in the order the adapter pool indexes them.
LORA_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
# Projections that share an input and so one fused base GEMM and one LoRA
# shrink/expand launch; values are (first module index, number of slices).
LORA_GROUPS: dict[str, tuple[int, int]] = {
    "qkv": (0, 3),
    "o": (3, 1),
    "gate_up": (4, 2),
    "down": (6, 1),
}
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


def group_slice_offsets(cfg: "ModelConfig") -> dict[str, tuple[int, ...]]:
    """Column boundaries of each slice inside a group's fused output (q|k|v: 0, q, q+k, q+k+v)."""
    return {
        group: tuple(accumulate((cfg.module_shape(m)[0] for m in LORA_MODULES[lo : lo + n]), initial=0))
        for group, (lo, n) in LORA_GROUPS.items()
    }


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    # Llama-3 style frequency scaling: (factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings), or None.
    rope_llama3: tuple[float, float, float, int] | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        """From a transformers PretrainedConfig (v4 or v5 field names)."""
        model_type = hf.model_type
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        llama3 = None
        if rope_type == "llama3":
            llama3 = (
                float(rope["factor"]),
                float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]),
                int(rope["original_max_position_embeddings"]),
            )
        elif rope_type not in ("default", None):
            raise ValueError(f"rope scaling {rope_type!r} is not supported (default and llama3 are)")
        eos = hf.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=float(theta),
            max_position_embeddings=int(hf.max_position_embeddings),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=bool(getattr(hf, "attention_bias", False)) or model_type == "qwen2",
            rope_llama3=llama3,
            eos_token_ids=eos_ids,
            bos_token_id=getattr(hf, "bos_token_id", None),
        )

    def module_shape(self, module: str) -> tuple[int, int]:
        """(out_features, in_features) of one LoRA-able linear."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (q, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, q),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }[module]


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"
    block_size: int = 16
    kv_cache_bytes: int = 512 * 2**20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_loras_per_batch: int = 16
    max_lora_rank: int = 64
    # Byte budget of the device adapter pool of rank-row pages (see
    # kernels/reference.py); the page count follows from the model's shape.
    adapter_pool_bytes: int = 1024 * 2**20
    max_adapter_slots: int = 64
    # Byte budget of the host tier (adapter weights cached from disk, pinned
    # on CUDA); None: 0 on a CPU, where the device tier is host memory, else 4 GiB.
    adapter_host_bytes: int | None = None
    # Load the adapters of waiting requests ahead of their turn (a worker thread).
    adapter_prefetch: bool = True
    # Bounded unfairness: a waiting request is served before any later
    # arrival once it has been passed over this many steps.
    max_wait_steps: int = 32
    max_waiting: int = 1024
    # Bytes of per-request mixes (`adapters: [...]`) held at once, built or
    # being built; a request whose mix would not fit gets 429.
    mix_pool_bytes: int = 256 * 2**20

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {self.dtype!r}")
        for name in ("block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens",
                     "max_loras_per_batch", "max_lora_rank", "adapter_pool_bytes",
                     "max_adapter_slots", "max_wait_steps", "max_waiting", "mix_pool_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.adapter_host_bytes is not None and self.adapter_host_bytes < 0:
            raise ValueError("adapter_host_bytes must be >= 0")
