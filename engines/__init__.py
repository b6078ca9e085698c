"""The network built from a ModelSpec, the runtime, and the executors."""
