"""The engine: requests, scheduling, KV blocks, sampling, detokenizing; one step at a time."""
