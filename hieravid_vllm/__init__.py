"""HieraVid for vLLM: hierarchical (segment / frame / layer) video token pruning.

``hieravid_vllm.core`` is the algorithm as pure PyTorch functions (no vLLM import);
``hieravid_vllm.plugin`` is the vLLM general plugin entry point.
"""

__version__ = "0.1.0"
