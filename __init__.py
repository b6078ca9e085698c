"""nemo3: deploy NVIDIA Nemotron 3 (hybrid Mamba-2 / attention / LatentMoE / MTP) models.

Reading order: export/ (what the model is) -> quant/ (precision) -> plugins/ (kernels) ->
engines/ (network and runtime) -> triton_repo/ (serving) -> pipeline.py (the build) -> cli/.
"""

__version__ = "0.1.0"


def load(path=None, device="cpu", dtype=None):
    """Load a Nemotron 3 checkpoint (default: the built-in tiny model) as a `nemo3.engines.network.model.Model`."""
    from .engines.network.loading import load as _load

    return _load(path, device=device, dtype=dtype)
