"""vLLM general-plugin entry point (``vllm.general_plugins`` -> ``hieravid``).

vLLM calls :func:`register` in every process it starts. It registers the HieraVid model
variants under their own architecture names (so they never replace vLLM's classes) and
applies the small patches of the registry :mod:`hieravid_vllm.patches`. A checkpoint is
served by its HieraVid variant only when HieraVid options are given (``--hieravid-budget``
...); otherwise vLLM behaves exactly as without the plugin, except that bad media get a 400
instead of a 500 (``hieravid_vllm/patches/api_server/``).
"""
import logging

logger = logging.getLogger("vllm.hieravid_vllm")


def register() -> None:
    """Register HieraVid with vLLM (idempotent)."""
    from vllm import ModelRegistry

    from hieravid_vllm import patches
    from hieravid_vllm.models import HIERAVID_ARCHITECTURES

    for name, path in HIERAVID_ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, path)
    patches.apply_all()
