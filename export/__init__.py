"""What the model is: config -> ModelSpec, checkpoint reading, naming, sharding, the built-in model."""
