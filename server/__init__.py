"""loramux: one base LLM, many LoRA adapters, one batch."""
