"""The model: the Llama family over a flat batch, its loader and runner, and the LoRA backends."""
