"""Patches of the engine-core process (KV cache groups, block hashes, the stage KV
managers). Listed in :mod:`hieravid_vllm.patches`."""
