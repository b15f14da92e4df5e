"""Build-time check of the hieravid-vllm image (run by the Dockerfile, no GPU needed).

Fails the build when the base image's vLLM is not one the plugin supports (0.32.x or 0.33.x,
``hieravid_vllm.engine_setup.SUPPORTED_VLLM``), when a runtime dependency of the
plugin is missing (it is installed with --no-deps on purpose), or when the vLLM plugin
entry point is not registered. Does not import vLLM itself (that needs a GPU).
"""
import importlib
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version



def main() -> int:
    errors = []
    try:
        from hieravid_vllm.engine_setup import SUPPORTED_VLLM  # no vLLM import
    except Exception as exc:  # noqa: BLE001 - reported below with the other checks
        errors.append(f"import hieravid_vllm.engine_setup: {type(exc).__name__}: {exc}")
        SUPPORTED_VLLM = ()
    try:
        vllm_version = version("vllm")
    except PackageNotFoundError:
        vllm_version = None
    if SUPPORTED_VLLM and (not vllm_version or not vllm_version.startswith(SUPPORTED_VLLM)):
        errors.append(f"base image has vllm {vllm_version!r}; hieravid-vllm supports "
                      f"{', '.join(v + 'x' for v in SUPPORTED_VLLM)}")

    for module in ("torch", "pydantic", "numpy", "cv2", "hieravid_vllm", "hieravid_kernels"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - report every failure, then fail
            errors.append(f"import {module}: {type(exc).__name__}: {exc}")

    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    if plugins.get("hieravid") != "hieravid_vllm.plugin:register":
        errors.append(f"vllm.general_plugins entry point 'hieravid' missing: {plugins}")

    try:
        ray_version = version("ray")
    except PackageNotFoundError:
        ray_version = "not installed (multi-node ray-head/ray-worker modes unavailable)"

    if errors:
        for e in errors:
            print(f"[verify_image] ERROR {e}", file=sys.stderr)
        return 1
    print(f"[verify_image] ok: vllm {vllm_version}, torch {version('torch')}, "
          f"hieravid-vllm {version('hieravid-vllm')}, ray {ray_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
