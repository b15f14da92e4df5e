"""Triton kernels for HieraVid, installed as ``hieravid_kernels``."""
