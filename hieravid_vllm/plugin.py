"""vLLM general-plugin entry point (``vllm.general_plugins`` -> ``hieravid``).

vLLM calls :func:`register` in every process it starts. Until HieraVid is enabled the
plugin must leave vLLM's behaviour unchanged.
"""


def register() -> None:
    """Register HieraVid with vLLM (no-op until the model variants land)."""
    return None
