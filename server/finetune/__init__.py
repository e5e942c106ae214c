"""Fine-tuning: training data, the recipe, jobs and the training worker (transformers + PEFT)."""
