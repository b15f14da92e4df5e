"""Patches of the API-server process (CLI flags, engine config, prompt checks, media
loading, the multimodal processor cache's shadow). Listed in :mod:`hieravid_vllm.patches`."""
