"""Everything about adapters that is neither HTTP nor device math: the PEFT
format and strict safetensors I/O, the atomic on-disk store, the registry,
the tiers (host cache, device pages, residency, prefetch) and arithmetic."""
