"""The request-level runtime: the scheduler (continuous batching, sampling, speculation), request types, state
slots, the serving thread, and the factory that assembles them from a build folder."""
