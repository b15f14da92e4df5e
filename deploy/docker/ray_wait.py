"""Wait until the local Ray cluster has N alive nodes (used by `entrypoint.sh ray-head`).

usage: ray_wait.py N TIMEOUT_S
vLLM's Ray executor places its workers when `vllm serve` starts; if worker pods have not
joined yet it fails for lack of GPUs, so the head waits for the whole cluster first.
"""
import sys
import time


def main() -> int:
    want, timeout = int(sys.argv[1]), float(sys.argv[2])
    import ray

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    deadline = time.monotonic() + timeout
    alive = 0
    while time.monotonic() < deadline:
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        gpus = ray.cluster_resources().get("GPU", 0)
        print(f"[ray_wait] {alive}/{want} nodes alive, {gpus:g} GPUs", flush=True)
        if alive >= want:
            ray.shutdown()
            return 0
        time.sleep(5)
    print(f"[ray_wait] timed out after {timeout:g}s with {alive}/{want} nodes", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
