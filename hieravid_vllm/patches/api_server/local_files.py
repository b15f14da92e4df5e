"""``MediaConnector._load_file_url``: ``file://`` without ``--allowed-local-media-path``.

What: such a URL becomes a 400 with vLLM's own message ("Cannot load local files without
`--allowed-local-media-path`."). A path outside the allowed folder is already a 400.
Why: vLLM raises ``RuntimeError`` there (a 500), and a rejected request used to leave the
processor caches out of step.
When it can go: when vLLM raises a client error for it.
Changes only responses that were errors already.
"""
from __future__ import annotations

from hieravid_vllm.patches._wrap import wrap

MODULE = "vllm.multimodal.media.connector"
TARGETS = ("MediaConnector._load_file_url",)


def apply(module) -> None:
    def make(orig):
        def _load_file_url(self, url_spec, media_io):
            if self.allowed_local_media_path is None:  # vLLM raises RuntimeError: a 500
                from vllm.exceptions import VLLMValidationError

                raise VLLMValidationError(
                    "Cannot load local files without `--allowed-local-media-path`.",
                    parameter="url", value=str(url_spec.url)[:200])
            return orig(self, url_spec, media_io)
        return _load_file_url

    wrap(module.MediaConnector, "_load_file_url", make)
