"""Patches of the worker processes (the V1 model runners; Model Runner V2 refuses a
HieraVid model). Applied when the runner module is imported. Listed in
:mod:`hieravid_vllm.patches`."""
