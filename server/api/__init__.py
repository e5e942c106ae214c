"""The HTTP front end: OpenAI's routes and loramux's own, over the engine."""
