"""Container health check: GET http://127.0.0.1:$PORT/health, exit 0 on HTTP 200.

vLLM's /health is not behind --api-key (only /v1, /v2, /inference ... are), so no key
is needed. Standard library only: the base image need not ship curl.
"""
import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("PORT", "8000")
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT", "8"))) as r:
            ok = r.status == 200
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"unhealthy: {url}: HTTP {r.status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
