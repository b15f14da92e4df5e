# hieravid-vllm serving image: the official vLLM OpenAI server image + the HieraVid plugin.
#
#   docker build -t hieravid-vllm:0.1.0 .
#   docker run --gpus all --shm-size 8g -p 8000:8000 -v hf-cache:/models \
#     -e VLLM_API_KEY -e HF_TOKEN -e HIERAVID_BUDGET=0.3 \
#     hieravid-vllm:0.1.0 Qwen/Qwen2.5-VL-7B-Instruct
#
# Base image. The plugin supports upstream vLLM 0.32.x and 0.33.x; the default below is
# 0.32.0 (tests/test_deploy.py checks it is a supported one). Pick 0.33 with the build arg:
#   docker build --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.33.0 -t hieravid-vllm:0.1.0-vllm0.33 .
# For production pin the digest as well, so a re-pushed tag cannot change what you build:
#   docker buildx imagetools inspect vllm/vllm-openai:v0.32.0   # prints "Digest: sha256:..."
#   docker build --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.32.0@sha256:<digest> -t hieravid-vllm:0.1.0 .
# (or replace the default below with the tag@digest form). See deploy/OPERATOR_GUIDE.md.
# Needs BuildKit (the default builder since Docker 23) for COPY --chmod.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

LABEL org.opencontainers.image.title="hieravid-vllm" \
      org.opencontainers.image.description="vLLM OpenAI-compatible server with HieraVid video token pruning" \
      org.opencontainers.image.version="0.1.0"

USER 0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Only what the package build needs (see .dockerignore): no tests, no weights, no venv.
COPY setup.py README.md /tmp/hieravid-src/
COPY hieravid_vllm /tmp/hieravid-src/hieravid_vllm
COPY kernels /tmp/hieravid-src/kernels

# --no-deps: vLLM, torch, pydantic, numpy and opencv-python-headless come with the base image
# and must not be replaced (not the cpu extra either). verify_image.py fails the build if a
# runtime dependency is missing or the base image's vLLM is not 0.32.x / 0.33.x.
COPY deploy/docker/verify_image.py /opt/hieravid/verify_image.py
RUN if command -v uv >/dev/null; then \
        uv pip install --system --no-cache --no-deps /tmp/hieravid-src; \
    else \
        python3 -m pip install --no-cache-dir --no-deps /tmp/hieravid-src; \
    fi \
    && rm -rf /tmp/hieravid-src \
    && python3 /opt/hieravid/verify_image.py

# Non-root runtime user; group 0 so arbitrary-UID platforms (OpenShift) can write too.
# /models is the Hugging Face cache: mount a volume there, weights are never baked in.
RUN useradd --no-log-init --uid 10001 --gid 0 --create-home --home-dir /home/hieravid \
        --shell /usr/sbin/nologin hieravid \
    && mkdir -p /models/huggingface \
    && chown -R 10001:0 /models /home/hieravid \
    && chmod -R g=u /models /home/hieravid

COPY --chmod=0755 deploy/docker/entrypoint.sh /opt/hieravid/entrypoint.sh
COPY --chmod=0644 deploy/docker/healthcheck.py deploy/docker/ray_wait.py /opt/hieravid/

# HF_TOKEN and VLLM_API_KEY are deliberately not set here: pass them at run time
# (environment, or *_FILE pointing at a mounted secret). Never bake secrets into the image.
ENV HOME=/home/hieravid \
    HF_HOME=/models/huggingface \
    HOST=0.0.0.0 \
    PORT=8000 \
    VLLM_MEDIA_URL_ALLOW_REDIRECTS=0 \
    VLLM_VIDEO_FETCH_TIMEOUT=10 \
    VLLM_IMAGE_FETCH_TIMEOUT=10 \
    VLLM_MEDIA_FETCH_MAX_RETRIES=1 \
    PYTHONUNBUFFERED=1

VOLUME ["/models"]
EXPOSE 8000
WORKDIR /home/hieravid
USER 10001

# Loading a 7B model (and downloading it on first start) takes minutes: failures during
# the start period do not count.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20m --retries=3 \
    CMD ["python3", "/opt/hieravid/healthcheck.py"]

# `docker run IMAGE [MODEL] [vllm serve flags...]`, or MODEL / HIERAVID_* from the
# environment; `ray-head` / `ray-worker` for multi-node serving (deploy/k8s/multi-node-ray).
ENTRYPOINT ["/opt/hieravid/entrypoint.sh"]
