#!/usr/bin/env python
"""Multiple-choice video QA accuracy of any OpenAI-compatible endpoint (vLLM with or without
HieraVid, or anything else that speaks ``/v1/chat/completions`` with ``video_url`` parts).

Sub-commands::

    # 1. convert a public benchmark layout to the harness's JSONL
    python benchmarks/accuracy.py convert --format videomme  videomme/test-00000-of-00001.parquet \\
        videomme.jsonl --video-root /data/Video-MME/data
    python benchmarks/accuracy.py convert --format mvbench   /data/MVBench/json mvbench.jsonl \\
        --video-root /data/MVBench/video
    python benchmarks/accuracy.py convert --format nextqa    /data/NExT-QA/val.csv nextqa.jsonl \\
        --video-root /data/NExT-QA/NExTVideo --map /data/NExT-QA/map_vid_vidorID.json
    python benchmarks/accuracy.py convert --format egoschema /data/EgoSchema/questions.json \\
        egoschema.jsonl --answers /data/EgoSchema/subset_answers.json --video-root /data/EgoSchema/videos

    # 2. evaluate an endpoint (unpruned baseline, then HieraVid) on the same JSONL
    python benchmarks/accuracy.py run --base-url http://127.0.0.1:8000/v1 \\
        --model Qwen/Qwen2.5-VL-7B-Instruct --data videomme.jsonl --concurrency 16 \\
        --out runs/base.json
    python benchmarks/accuracy.py run --base-url http://127.0.0.1:8001/v1 \\
        --model Qwen/Qwen2.5-VL-7B-Instruct --data videomme.jsonl --concurrency 16 \\
        --out runs/hv30.json --baseline runs/base.json

    # 3. re-print the tables of saved runs (no requests)
    python benchmarks/accuracy.py report runs/hv30.json --baseline runs/base.json

    # smoke set with known answers (how many scenes does each synthetic clip show?)
    python benchmarks/accuracy.py synth out/synth --n 12

JSONL item (one per line)::

    {"id": "001-1", "video": "videos/fFjv93ACGo8.mp4", "question": "...",
     "options": ["a cat", "a dog", "a bird", "a fish"], "answer": "B", "category": "..."}

``video`` is a local path (relative paths: against ``--video-root``, else the JSONL's folder),
a ``file://`` URL (read locally), an ``http(s)://`` URL or a ``data:`` URL (passed through).
Local files are sent inline as base64 ``data:`` URLs, so the server needs no file access
(vLLM is served without ``--allowed-local-media-path``). ``answer`` is a letter; an option
index (int) or the option's text are accepted too. ``category`` is optional (per-category
table). Other fields are kept (``start``/``end`` of MVBench tasks are recorded but not
applied: the whole video is sent).

Prompt (LLaVA-Video / lmms-eval multiple-choice prompt)::

    <video> {question}
    A. {option 0}
    B. {option 1}
    ...
    Answer with the option's letter from the given choices directly.

Scoring: the reply's letter is extracted by :func:`extract_letter` (a bare letter, "(B)",
"Answer: B.", "The answer is B) cat", the text of one option, lowercase forms, ...). A reply
with no unambiguous letter is counted wrong as ``unparsed``; a request that still fails after
``--retries`` retries (HTTP error, timeout, connection error) is counted wrong as ``error``
and listed in the report with its message (4xx answers are not retried: they are
deterministic). Accuracy = correct / all items. With ``--baseline`` (the JSON of a previous
run, e.g. the unpruned server) the report adds the paper's "%" column: accuracy / baseline
accuracy x 100, overall and per category, computed over the items both runs share.

Outputs: a markdown table on stdout (``--markdown FILE`` also writes it) and the JSON of the
run (``--out``): settings, summary, per-category numbers, and one record per item with the
raw reply, the extracted letter, the status, the error (if any), attempts, prompt tokens and
latency.

On GPU nodes with real checkpoints: serve the model twice (``vllm serve MODEL`` and
``vllm serve MODEL --hieravid-budget 0.3``, e.g. with ``--media-io-kwargs
'{"video": {"num_frames": 64}}'`` for the paper's 64 frames), run the baseline, then the pruned
server with ``--baseline``. See README.md, section "Accuracy".
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import csv
import json
import mimetypes
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STATUSES = ("correct", "wrong", "unparsed", "error")

_VIDEO_MIME = {".mp4": "video/mp4", ".m4v": "video/mp4", ".webm": "video/webm",
               ".mkv": "video/x-matroska", ".avi": "video/x-msvideo", ".mov": "video/quicktime",
               ".gif": "image/gif", ".mpeg": "video/mpeg", ".mpg": "video/mpeg"}


# =========================================================================================
# Items
# =========================================================================================
@dataclass
class Item:
    """One multiple-choice question (the JSONL schema)."""

    id: str
    video: str
    question: str
    options: list[str]
    answer: str  # a letter A..
    category: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"id": self.id, "video": self.video, "question": self.question,
             "options": list(self.options), "answer": self.answer}
        if self.category is not None:
            d["category"] = self.category
        d.update(self.extra)
        return d


def _norm_text(s: str) -> str:
    """Lowercase, punctuation to spaces, single spaces (for option-text matching)."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(s).lower()).split())


def _no_articles(s: str) -> str:
    """:func:`_norm_text` without the words a / an / the (unless nothing else is left)."""
    words = _norm_text(s).split()
    kept = [w for w in words if w not in ("a", "an", "the")]
    return " ".join(kept or words)


def normalize_answer(answer: Any, options: Sequence[str], where: str = "") -> str:
    """The answer as a letter: a letter (any case, "(B)", "B."), an int index, or option text."""
    n = len(options)
    if isinstance(answer, bool):
        raise ValueError(f"{where}answer must be a letter, an index or option text, got {answer!r}")
    if isinstance(answer, int):
        if not 0 <= answer < n:
            raise ValueError(f"{where}answer index {answer} out of range for {n} options")
        return LETTERS[answer]
    s = str(answer).strip()
    m = re.fullmatch(r"\(?([A-Za-z])[\).:]?", s)
    if m and LETTERS.index(m.group(1).upper()) < n:
        return m.group(1).upper()
    if s.isdigit() and int(s) < n:
        return LETTERS[int(s)]
    hits = [i for i, o in enumerate(options) if _norm_text(o) == _norm_text(s)]
    if len(hits) == 1:
        return LETTERS[hits[0]]
    raise ValueError(f"{where}answer {answer!r} is neither a letter within the {n} options, "
                     "an index, nor the text of exactly one option")


def item_from_dict(d: dict, where: str = "") -> Item:
    for key in ("video", "question", "options", "answer"):
        if key not in d:
            raise ValueError(f"{where}missing field {key!r}")
    opts = d["options"]
    if not isinstance(opts, list) or len(opts) < 2 or len(opts) > len(LETTERS):
        raise ValueError(f"{where}options must be a list of 2..26 strings")
    opts = [str(o) for o in opts]
    known = {"id", "video", "question", "options", "answer", "category"}
    return Item(id=str(d.get("id", where.strip(": ") or "?")), video=str(d["video"]),
                question=str(d["question"]), options=opts,
                answer=normalize_answer(d["answer"], opts, where),
                category=None if d.get("category") is None else str(d["category"]),
                extra={k: v for k, v in d.items() if k not in known})


def load_items(path: str | os.PathLike) -> list[Item]:
    """Read a JSONL file (blank lines skipped); ids default to the line number, must be unique."""
    items, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}: "
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}invalid JSON ({e})") from None
            d.setdefault("id", str(lineno))
            it = item_from_dict(d, where)
            if it.id in seen:
                raise ValueError(f"{where}duplicate id {it.id!r}")
            seen.add(it.id)
            items.append(it)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def write_jsonl(items: Iterable[Item], path: str | os.PathLike) -> int:
    n = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


# =========================================================================================
# Prompt and video
# =========================================================================================
def build_prompt(item: Item, suffix: str = PROMPT_SUFFIX) -> str:
    """Question, lettered options one per line, then the instruction (LLaVA-Video eval)."""
    lines = [item.question.strip()]
    lines += [f"{LETTERS[i]}. {o}" for i, o in enumerate(item.options)]
    if suffix:
        lines.append(suffix)
    return "\n".join(lines)


def resolve_video(video: str, root: Optional[Path]) -> str:
    """URL passed through, or an absolute local path (``file://`` stripped)."""
    if re.match(r"^(https?|data):", video):
        return video
    if video.startswith("file://"):
        video = video[len("file://"):]
    p = Path(video).expanduser()
    if not p.is_absolute() and root is not None:
        p = root / p
    return str(p)


def video_url(video: str) -> str:
    """What goes into the ``video_url`` part: URLs as they are, local files as data URLs."""
    if re.match(r"^(https?|data):", video):
        return video
    mime = _VIDEO_MIME.get(Path(video).suffix.lower()) or mimetypes.guess_type(video)[0] \
        or "video/mp4"
    return f"data:{mime};base64," + base64.b64encode(Path(video).read_bytes()).decode("ascii")


def build_messages(item: Item, video: str, suffix: str = PROMPT_SUFFIX,
                   system: Optional[str] = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video_url(video)}},
        {"type": "text", "text": build_prompt(item, suffix)}]})
    return msgs


# =========================================================================================
# Answer-letter extraction
# =========================================================================================
_LEAD = re.compile(
    r"^\s*(?:(?:the\s+)?(?:correct\s+|best\s+|final\s+)?(?:answer|option|choice)"
    r"(?:\s+is)?\s*[:\-]?\s*|my\s+answer\s+is\s*:?\s*)", re.I)
_KEYWORD = re.compile(r"\b(?:answer|option|choice)\b\s*(?:is|:|=)?\s*(?:option\s+)?"
                      r"[\(\[\*\"']*([A-Za-z])(?![A-Za-z])", re.I)
#: after "A"/"a": an ordinary lowercase word means the article ("A cat"), "or"/"and" not
_ARTICLE_NEXT = re.compile(r"\s+(?!(?:or|and|nor|is|was)\b)[a-z]")
_BRACKETED = re.compile(r"[\(\[]([A-Za-z])[\)\]]")


def extract_letter(text: Optional[str], options: Sequence[str]) -> tuple[Optional[str], str]:
    """The option letter a free-text reply chooses, and how it was found.

    Returns ``(letter, method)``; ``letter`` is None (method ``"unparsed"``) when the reply
    names no option or several. Tried in order, first hit wins:

    1. ``bare``: the whole reply, stripped of markdown/quotes/"Answer:"-style lead-ins, is one
       letter in range with optional brackets/punctuation ("B", "(b)", "Answer: B.", "**C**");
    2. ``leading``: the reply starts with a letter followed by ``)``/``.``/``:`` ("B) cat",
       "c. dog") or by that option's own text ("B cat"); an uppercase "A" followed by an
       ordinary word is read as the article, not the letter;
    3. ``keyword``: "answer is (C)", "option D", "the correct choice: b" anywhere; all such
       mentions must agree;
    4. ``option_text``: the reply is, or contains, the text of exactly one option (an option
       contained in a longer matching option does not count separately);
    5. ``bracketed``: exactly one distinct "(X)" letter in range anywhere;
    6. ``standalone``: exactly one distinct uppercase letter in range standing alone as a
       word (article "A" excluded as in 2).
    """
    n = len(options)
    valid = set(LETTERS[:n])
    if text is None:
        return None, "unparsed"
    s = str(text).strip()
    if not s:
        return None, "unparsed"
    # without markdown emphasis / quotes, then without an "Answer:"-style lead-in
    clean = re.sub(r"[\*`_\"']", "", s).strip()
    core = _LEAD.sub("", clean).strip()
    # 1. bare (the whole reply, or its first line: "B\n\nExplanation: ...")
    first = core.splitlines()[0].strip() if core else ""
    for cand in (core, first):
        m = re.fullmatch(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[\.\:,;!]?", cand)
        if m and m.group(1).upper() in valid:
            return m.group(1).upper(), "bare"
    # 2. leading letter: "B) cat", "c. dog", "(D) ..." or "B cat" (B's own text follows)
    m = re.match(r"[\(\[]?([A-Za-z])\s*[\)\]\.:](?![A-Za-z])", core)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper(), "leading"
    m = re.match(r"([A-Z])\s+(.+)", first)
    if m and m.group(1) in valid:
        rest = _norm_text(m.group(2))
        opt = _norm_text(options[LETTERS.index(m.group(1))])
        if opt and (rest == opt or rest.startswith(opt + " ")):
            return m.group(1), "leading"
    # 3. keyword ("answer is a cat": a letter followed by a lowercase word is the article)
    kw = [x for x in _KEYWORD.finditer(clean)
          if not (x.group(1) in "aA" and _ARTICLE_NEXT.match(clean[x.end():]))]
    found = {x.group(1).upper() for x in kw} & valid
    if len(found) == 1:
        return found.pop(), "keyword"
    if len(found) > 1:
        return None, "unparsed"
    # 4. option text (articles ignored: "the cat" matches "a cat")
    low = _no_articles(s)
    if low:
        norm_opts = [_no_articles(o) for o in options]
        exact = [i for i, o in enumerate(norm_opts) if o and o == low]
        if len(exact) == 1:
            return LETTERS[exact[0]], "option_text"
        padded = f" {low} "
        hits = [i for i, o in enumerate(norm_opts) if o and f" {o} " in padded]
        hits = [i for i in hits if not any(j != i and norm_opts[i] != norm_opts[j]
                                           and f" {norm_opts[i]} " in f" {norm_opts[j]} "
                                           for j in hits)]
        if len(hits) == 1:
            return LETTERS[hits[0]], "option_text"
    # 5. bracketed
    found = {x.upper() for x in _BRACKETED.findall(s)} & valid
    if len(found) == 1:
        return found.pop(), "bracketed"
    # 6. standalone uppercase letter
    cands = set()
    for x in re.finditer(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])", s):
        c = x.group(1)
        if c not in valid:
            continue
        if c == "A" and _ARTICLE_NEXT.match(s[x.end():]):
            continue
        cands.add(c)
    if len(cands) == 1:
        return cands.pop(), "standalone"
    return None, "unparsed"


# =========================================================================================
# Requests
# =========================================================================================
class RequestFailed(Exception):
    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Record:
    id: str
    category: Optional[str]
    answer: str
    response: Optional[str] = None
    extracted: Optional[str] = None
    method: Optional[str] = None
    status: str = "error"
    error: Optional[str] = None
    attempts: int = 0
    attempt_errors: list = field(default_factory=list)
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    latency_s: Optional[float] = None


def _post_chat(client, url: str, body: dict, headers: dict, timeout: float) -> dict:
    import httpx

    try:
        r = client.post(url, json=body, headers=headers, timeout=timeout)
    except httpx.TimeoutException as e:
        raise RequestFailed(f"timeout after {timeout:g} s ({type(e).__name__})", True) from None
    except httpx.HTTPError as e:
        raise RequestFailed(f"{type(e).__name__}: {e}", True) from None
    if r.status_code != 200:
        detail = r.text.strip().replace("\n", " ")[:300]
        retryable = r.status_code in (408, 409, 425, 429) or r.status_code >= 500
        raise RequestFailed(f"HTTP {r.status_code}: {detail}", retryable)
    try:
        data = r.json()
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise RequestFailed(f"malformed response ({type(e).__name__}: {r.text[:200]!r})",
                            False) from None
    return data if isinstance(content, (str, type(None))) else {**data, "_content": str(content)}


def evaluate_item(item: Item, *, client, url: str, model: str, headers: dict, timeout: float,
                  retries: int, max_tokens: int, video_root: Optional[Path],
                  suffix: str = PROMPT_SUFFIX, system: Optional[str] = None,
                  extra_body: Optional[dict] = None, backoff: float = 1.0) -> Record:
    rec = Record(item.id, item.category, item.answer)
    try:
        messages = build_messages(item, resolve_video(item.video, video_root), suffix, system)
    except OSError as e:
        rec.error = f"cannot read video: {e}"
        return rec
    body = {"model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0.0}
    body.update(extra_body or {})
    for attempt in range(retries + 1):
        rec.attempts = attempt + 1
        t0 = time.perf_counter()
        try:
            data = _post_chat(client, url, body, headers, timeout)
        except RequestFailed as e:
            rec.attempt_errors.append(str(e))
            rec.error = str(e)
            if not e.retryable or attempt == retries:
                return rec
            time.sleep(backoff * (2 ** attempt))
            continue
        rec.latency_s = round(time.perf_counter() - t0, 4)
        rec.error = None
        msg = data["choices"][0]["message"]
        rec.response = data.get("_content", msg.get("content")) or ""
        usage = data.get("usage") or {}
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.completion_tokens = usage.get("completion_tokens")
        rec.extracted, rec.method = extract_letter(rec.response, item.options)
        if rec.extracted is None:
            rec.status = "unparsed"
        else:
            rec.status = "correct" if rec.extracted == item.answer else "wrong"
        return rec
    return rec  # pragma: no cover - loop always returns


def run_eval(items: Sequence[Item], base_url: str, model: str, api_key: Optional[str] = None,
             concurrency: int = 4, timeout: float = 600.0, retries: int = 2,
             max_tokens: int = 16, video_root: Optional[Path] = None,
             suffix: str = PROMPT_SUFFIX, system: Optional[str] = None,
             extra_body: Optional[dict] = None, progress: bool = True,
             backoff: float = 1.0) -> list[Record]:
    """Send every item (``concurrency`` in flight), return records in the items' order."""
    import httpx

    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    out: list[Optional[Record]] = [None] * len(items)
    bar = _progress(len(items), progress)
    lock = threading.Lock()
    tally = {s: 0 for s in STATUSES}
    with httpx.Client(limits=limits) as client:
        def one(i: int) -> None:
            rec = evaluate_item(items[i], client=client, url=url, model=model, headers=headers,
                                timeout=timeout, retries=retries, max_tokens=max_tokens,
                                video_root=video_root, suffix=suffix, system=system,
                                extra_body=extra_body, backoff=backoff)
            out[i] = rec
            with lock:
                tally[rec.status] += 1
                if bar is not None:
                    done = sum(tally.values())
                    bar.set_postfix(acc=f"{tally['correct'] / done:.3f}",
                                    unparsed=tally["unparsed"], errors=tally["error"])
                    bar.update(1)
            if rec.status == "error":
                print(f"[accuracy] item {rec.id}: {rec.error}", file=sys.stderr)

        with cf.ThreadPoolExecutor(max_workers=concurrency) as pool:
            for f in [pool.submit(one, i) for i in range(len(items))]:
                f.result()
    if bar is not None:
        bar.close()
    return [r for r in out if r is not None]


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the bench/test extras
        return None
    return tqdm(total=total, desc="accuracy", unit="q", file=sys.stderr, dynamic_ncols=True)


# =========================================================================================
# Summary, baseline, tables
# =========================================================================================
def _acc(recs: Sequence[dict]) -> Optional[float]:
    return sum(r["status"] == "correct" for r in recs) / len(recs) if recs else None


def summarize(records: Sequence[dict], baseline: Optional[Sequence[dict]] = None) -> dict:
    """Accuracy, status counts, per-category accuracy, and relative-to-baseline numbers.

    ``records``/``baseline``: record dicts (``status``, ``id``, ``category``). Relative
    accuracy (paper's "%") = acc / baseline acc x 100 over the ids both runs contain.
    """
    recs = list(records)
    counts = {s: sum(r["status"] == s for r in recs) for s in STATUSES}
    pt = [r["prompt_tokens"] for r in recs if r.get("prompt_tokens") is not None]
    out: dict[str, Any] = {
        "total": len(recs), **counts, "accuracy": _acc(recs),
        "retried": sum((r.get("attempts") or 0) > 1 for r in recs),
        "mean_prompt_tokens": sum(pt) / len(pt) if pt else None,
        "errors_list": [{"id": r["id"], "error": r.get("error")}
                        for r in recs if r["status"] == "error"],
    }
    cats = sorted({r.get("category") for r in recs if r.get("category") is not None})
    out["per_category"] = {c: {"n": sum(r.get("category") == c for r in recs),
                               "accuracy": _acc([r for r in recs if r.get("category") == c])}
                           for c in cats}
    if baseline is not None:
        base = {r["id"]: r for r in baseline}
        common = [r for r in recs if r["id"] in base]
        b_common = [base[r["id"]] for r in common]
        a, b = _acc(common), _acc(b_common)
        out["baseline"] = {
            "n_common": len(common), "n_only_here": len(recs) - len(common),
            "n_only_baseline": len(base) - len(common), "accuracy_here": a,
            "accuracy_baseline": b,
            "relative_pct": (a / b * 100.0) if (a is not None and b) else None,
            "per_category": {},
        }
        for c in cats:
            cc = [r for r in common if r.get("category") == c]
            bc = [base[r["id"]] for r in cc]
            a_c, b_c = _acc(cc), _acc(bc)
            out["baseline"]["per_category"][c] = {
                "n": len(cc), "accuracy_here": a_c, "accuracy_baseline": b_c,
                "relative_pct": (a_c / b_c * 100.0) if (a_c is not None and b_c) else None}
    return out


def _pct(x: Optional[float], scale: float = 100.0) -> str:
    return "-" if x is None else f"{x * scale:.1f}"


def markdown_report(summary: dict, title: str = "") -> str:
    """The run's tables: overall + per category (+ baseline / relative columns)."""
    b = summary.get("baseline")
    head = ["", "n", "correct", "acc %"]
    if b:
        head += ["baseline acc %", "rel. %"]
    lines = [f"### {title}" if title else "", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    row = ["**all**", str(summary["total"]), str(summary["correct"]),
           _pct(summary["accuracy"])]
    if b:
        row += [_pct(b["accuracy_baseline"]), _pct(b["relative_pct"], 1.0)]
    lines.append("| " + " | ".join(row) + " |")
    for c, v in summary["per_category"].items():
        n_corr = round((v["accuracy"] or 0) * v["n"])
        row = [c, str(v["n"]), str(n_corr), _pct(v["accuracy"])]
        if b:
            bc = b["per_category"].get(c, {})
            row += [_pct(bc.get("accuracy_baseline")), _pct(bc.get("relative_pct"), 1.0)]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    mpt = summary.get("mean_prompt_tokens")
    lines.append(f"wrong {summary['wrong']}, unparsed {summary['unparsed']} (counted wrong), "
                 f"request errors {summary['error']} (counted wrong), retried "
                 f"{summary['retried']}; mean prompt tokens "
                 f"{'-' if mpt is None else f'{mpt:.1f}'}")
    if b and (b["n_only_here"] or b["n_only_baseline"]):
        lines.append(f"relative numbers over the {b['n_common']} shared items "
                     f"({b['n_only_here']} only here, {b['n_only_baseline']} only in the "
                     "baseline)")
    for e in summary.get("errors_list", [])[:10]:
        lines.append(f"- error `{e['id']}`: {e['error']}")
    if len(summary.get("errors_list", [])) > 10:
        lines.append(f"- ... {len(summary['errors_list']) - 10} more errors in the JSON")
    return "\n".join(lines).lstrip("\n") + "\n"


def load_run(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        run = json.load(f)
    if not isinstance(run, dict) or "records" not in run:
        raise ValueError(f"{path}: not a results file of benchmarks/accuracy.py (no 'records')")
    return run


# =========================================================================================
# Converters (public layouts -> JSONL)
# =========================================================================================
_OPT_PREFIX = re.compile(r"^\s*\(?([A-Za-z])[\.\)]\s*")


def _strip_letter(opt: str, i: int) -> str:
    """"A. text" / "(A) text" -> "text" when the letter is the option's own."""
    m = _OPT_PREFIX.match(opt)
    if m and m.group(1).upper() == LETTERS[i]:
        return opt[m.end():].strip()
    return opt.strip()


def _video_path(root: Optional[str], rel: str) -> str:
    return str(Path(root) / rel) if root else rel


def _read_table(path: Path) -> list[dict]:
    """Rows of a parquet / JSON (list or {"data": [...]}) / JSONL file."""
    suf = path.suffix.lower()
    if suf == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            try:
                import pandas as pd
            except ImportError:
                raise SystemExit("reading parquet needs pyarrow or pandas "
                                 "(pip install pyarrow), or pass the JSON export") from None
            return pd.read_parquet(path).to_dict("records")
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if suf == ".jsonl":
        return [json.loads(l) for l in text.splitlines() if l.strip()]
    data = json.loads(text)
    if isinstance(data, dict):
        for key in ("data", "rows", "test"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of rows")
    return [r.get("row", r) for r in data]  # HF datasets-server rows are {"row": {...}}


def convert_videomme(src: Path, video_root: Optional[str], category: str = "task_type",
                     ext: str = ".mp4") -> list[Item]:
    """Video-MME (lmms-lab/Video-MME ``videomme/test-*.parquet`` or its JSON export): rows with
    ``video_id``, ``duration`` (short/medium/long), ``domain``, ``sub_category``, ``videoID``
    (the YouTube id; the file is ``data/<videoID>.mp4``), ``question_id``, ``task_type``,
    ``question``, ``options`` (["A. ...", "B. ...", ...]) and ``answer`` (a letter).
    ``category``: which field becomes the category (``task_type``, ``duration``, ``domain``)."""
    items = []
    for k, r in enumerate(_read_table(src)):
        where = f"{src} row {k}: "
        opts = [_strip_letter(o, i) for i, o in enumerate(list(r["options"]))]
        extra = {f: r[f] for f in ("duration", "domain", "sub_category", "task_type", "video_id")
                 if r.get(f) is not None}
        items.append(Item(id=str(r.get("question_id") or k), question=str(r["question"]),
                          video=_video_path(video_root, f"{r['videoID']}{ext}"), options=opts,
                          answer=normalize_answer(r["answer"], opts, where),
                          category=None if r.get(category) is None else str(r[category]),
                          extra=extra))
    return items


#: MVBench tasks: json file -> (task name, video folder under MVBench/video/, data type,
#: has start/end bound). From the MVBench evaluation code (OpenGVLab/Ask-Anything).
MVBENCH_TASKS = {
    "action_sequence.json": ("Action Sequence", "star/Charades_v1_480/", "video", True),
    "action_prediction.json": ("Action Prediction", "star/Charades_v1_480/", "video", True),
    "action_antonym.json": ("Action Antonym", "ssv2_video/", "video", False),
    "fine_grained_action.json": ("Fine-grained Action", "Moments_in_Time_Raw/videos/", "video",
                                 False),
    "unexpected_action.json": ("Unexpected Action", "FunQA_test/test/", "video", False),
    "object_existence.json": ("Object Existence", "clevrer/video_validation/", "video", False),
    "object_interaction.json": ("Object Interaction", "star/Charades_v1_480/", "video", True),
    "object_shuffle.json": ("Object Shuffle", "perception/videos/", "video", False),
    "moving_direction.json": ("Moving Direction", "clevrer/video_validation/", "video", False),
    "action_localization.json": ("Action Localization", "sta/sta_video/", "video", True),
    "scene_transition.json": ("Scene Transition", "scene_qa/video/", "video", False),
    "action_count.json": ("Action Count", "perception/videos/", "video", False),
    "moving_count.json": ("Moving Count", "clevrer/video_validation/", "video", False),
    "moving_attribute.json": ("Moving Attribute", "clevrer/video_validation/", "video", False),
    "state_change.json": ("State Change", "perception/videos/", "video", False),
    "fine_grained_pose.json": ("Fine-grained Pose", "nturgbd/", "video", False),
    "character_order.json": ("Character Order", "perception/videos/", "video", False),
    "egocentric_navigation.json": ("Egocentric Navigation", "vlnqa/", "video", False),
    "episodic_reasoning.json": ("Episodic Reasoning", "tvqa/frames_fps3_hq/", "frame", True),
    "counterfactual_inference.json": ("Counterfactual Inference", "clevrer/video_validation/",
                                      "video", False),
}


def convert_mvbench(src: Path, video_root: Optional[str]) -> tuple[list[Item], list[str]]:
    """MVBench (OpenGVLab/MVBench): ``json/<task>.json`` files, each a list of ``{"video",
    "question", "candidates": [...], "answer": <candidate text>}`` (+ ``start``/``end`` in
    seconds for bounded tasks); videos under ``video/<task folder>/<video>``. ``src``: the
    ``json`` folder or one task file; category = task name. Tasks stored as frame folders
    (Episodic Reasoning) cannot be sent as one video and are skipped (returned as notes)."""
    files = sorted(src.glob("*.json")) if src.is_dir() else [src]
    items, notes = [], []
    for fpath in files:
        task, folder, kind, bound = MVBENCH_TASKS.get(
            fpath.name, (fpath.stem.replace("_", " ").title(), "", "video", False))
        if fpath.name not in MVBENCH_TASKS:
            notes.append(f"{fpath.name}: unknown task, videos taken from the video root itself")
        rows = json.loads(fpath.read_text(encoding="utf-8"))
        if kind == "frame":
            notes.append(f"{fpath.name}: {len(rows)} questions skipped (frame folders, not "
                         "videos)")
            continue
        for k, r in enumerate(rows):
            where = f"{fpath} row {k}: "
            opts = [str(c) for c in r["candidates"]]
            extra = {"task": task}
            if bound and "start" in r and "end" in r:
                extra.update(start=r["start"], end=r["end"])
            items.append(Item(id=f"{fpath.stem}/{k}", question=str(r["question"]),
                              video=_video_path(video_root, folder + str(r["video"])),
                              options=opts, answer=normalize_answer(r["answer"], opts, where),
                              category=task, extra=extra))
    return items, notes


#: NExT-QA question types (``type`` column) -> names used in its evaluation.
NEXTQA_TYPES = {"CW": "causal why", "CH": "causal how", "TN": "temporal next",
                "TC": "temporal concurrent", "TP": "temporal previous", "DC": "descriptive count",
                "DL": "descriptive location", "DO": "descriptive other"}


def convert_nextqa(src: Path, video_root: Optional[str], vid_map: Optional[Path],
                   ext: str = ".mp4") -> list[Item]:
    """NExT-QA multiple choice (doc-doc/NExT-QA ``dataset/nextqa/{val,test}.csv``): columns
    ``video, frame_count, width, height, question, answer, qid, type, a0..a4`` with ``answer``
    the index of the right ``a*``; videos at ``NExTVideo/<folder>/<vidorID>.mp4`` where
    ``map_vid_vidorID.json`` maps ``video`` -> ``"<folder>/<vidorID>"`` (without the map the
    ``video`` column is used as the relative path). Category = question type (CW, TN, ...)."""
    mapping = json.loads(vid_map.read_text(encoding="utf-8")) if vid_map else {}
    items = []
    with open(src, newline="", encoding="utf-8") as f:
        for k, r in enumerate(csv.DictReader(f)):
            where = f"{src} row {k + 2}: "
            opts = [r[f"a{i}"] for i in range(5) if r.get(f"a{i}") not in (None, "")]
            vid = str(r["video"]).strip()
            rel = mapping.get(vid, vid) + ext
            items.append(Item(id=f"{vid}_{r['qid']}", question=str(r["question"]).strip(),
                              video=_video_path(video_root, rel), options=opts,
                              answer=normalize_answer(int(r["answer"]), opts, where),
                              category=r.get("type") or None,
                              extra={"type_name": NEXTQA_TYPES.get(r.get("type", ""), "")}))
    return items


def convert_egoschema(src: Path, video_root: Optional[str], answers: Optional[Path],
                      ext: str = ".mp4") -> tuple[list[Item], list[str]]:
    """EgoSchema (egoschema/EgoSchema ``questions.json``): a list of ``{"q_uid",
    "google_drive_id", "question", "option 0" .. "option 4"}``; videos ``videos/<q_uid>.mp4``.
    Public answers exist only for the 500-question subset (``subset_answers.json``: {q_uid:
    index}); questions without an answer are skipped (returned as a note). No category."""
    rows = json.loads(src.read_text(encoding="utf-8"))
    if answers is None:
        raise SystemExit("egoschema: --answers subset_answers.json is required (the full "
                         "set's answers are not public)")
    ans = json.loads(answers.read_text(encoding="utf-8"))
    items, skipped = [], 0
    for k, r in enumerate(rows):
        uid = str(r["q_uid"])
        if uid not in ans:
            skipped += 1
            continue
        opts = [str(r[f"option {i}"]) for i in range(5) if f"option {i}" in r]
        items.append(Item(id=uid, question=str(r["question"]), options=opts,
                          video=_video_path(video_root, uid + ext),
                          answer=normalize_answer(int(ans[uid]), opts, f"{src} row {k}: ")))
    notes = [f"{skipped} questions without a public answer skipped"] if skipped else []
    return items, notes


def convert(fmt: str, src: str | os.PathLike, out: str | os.PathLike,
            video_root: Optional[str] = None, answers: Optional[str] = None,
            vid_map: Optional[str] = None, category: str = "task_type") -> tuple[int, list[str]]:
    """Convert ``src`` in layout ``fmt`` to the JSONL ``out``; returns (items, notes)."""
    srcp = Path(src)
    if not srcp.exists():
        raise SystemExit(f"convert: {src} does not exist")
    notes: list[str] = []
    if fmt == "videomme":
        items = convert_videomme(srcp, video_root, category)
    elif fmt == "mvbench":
        items, notes = convert_mvbench(srcp, video_root)
    elif fmt == "nextqa":
        items = convert_nextqa(srcp, video_root, Path(vid_map) if vid_map else None)
    elif fmt == "egoschema":
        items, notes = convert_egoschema(srcp, video_root, Path(answers) if answers else None)
    else:
        raise SystemExit(f"convert: unknown --format {fmt!r}")
    return write_jsonl(items, out), notes


# =========================================================================================
# Synthetic set (for smoke runs: ground truth known by construction)
# =========================================================================================
def write_synthetic_set(out_dir: str | os.PathLike, n: int = 12, num_frames: int = 16,
                        size: int = 112, fps: float = 4.0, seed: int = 0) -> Path:
    """``n`` clips of 1-4 scenes (``hieravid_vllm.testing.video.write_scene_video``) and a
    JSONL asking how many scenes each shows (options 1..4, category = the true count).
    Returns the JSONL path (videos relative to it)."""
    import random

    from hieravid_vllm.testing.video import write_scene_video

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    items = []
    for k in range(n):
        scenes = 1 + k % 4 if n >= 4 else rng.randint(1, 4)
        write_scene_video(out / f"synth_{k:03d}.mp4", num_frames=num_frames, width=size,
                          height=size, fps=fps, num_scenes=scenes, seed=seed * 1000 + k)
        items.append(Item(id=f"synth_{k:03d}", video=f"synth_{k:03d}.mp4",
                          question="How many different scenes (backgrounds) does the video "
                                   "show?", options=["1", "2", "3", "4"],
                          answer=LETTERS[scenes - 1], category=f"{scenes} scene(s)"))
    path = out / "synthetic.jsonl"
    write_jsonl(items, path)
    return path


# =========================================================================================
# CLI
# =========================================================================================
def _check_videos(items: Sequence[Item], root: Optional[Path]) -> list[str]:
    missing = []
    for it in items:
        v = resolve_video(it.video, root)
        if not re.match(r"^(https?|data):", v) and not Path(v).is_file():
            missing.append(f"{it.id}: {v}")
    return missing


def cmd_run(a: argparse.Namespace) -> int:
    items = load_items(a.data)
    if a.limit:
        items = items[: a.limit]
    root = Path(a.video_root) if a.video_root else Path(a.data).resolve().parent
    missing = _check_videos(items, root)
    if missing and not a.allow_missing:
        print(f"error: {len(missing)} video file(s) not found (first: {missing[0]}); fix the "
              "paths / --video-root, or pass --allow-missing to count them as errors",
              file=sys.stderr)
        return 2
    extra = json.loads(a.extra_body) if a.extra_body else None
    baseline = load_run(a.baseline)["records"] if a.baseline else None
    t0 = time.time()
    recs = run_eval(items, a.base_url, a.model, api_key=a.api_key or os.environ.get(
        "OPENAI_API_KEY"), concurrency=a.concurrency, timeout=a.timeout, retries=a.retries,
        max_tokens=a.max_tokens, video_root=root, suffix=a.prompt_suffix, system=a.system,
        extra_body=extra, progress=not a.no_progress)
    rec_dicts = [asdict(r) for r in recs]
    summary = summarize(rec_dicts, baseline)
    run = {"settings": {"base_url": a.base_url, "model": a.model, "data": str(a.data),
                        "concurrency": a.concurrency, "timeout_s": a.timeout,
                        "retries": a.retries, "max_tokens": a.max_tokens,
                        "prompt_suffix": a.prompt_suffix, "system": a.system,
                        "extra_body": extra, "baseline": a.baseline,
                        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
                        "wall_s": round(time.time() - t0, 2)},
           "summary": summary, "records": rec_dicts}
    table = markdown_report(summary, a.title or f"{a.model} on {Path(a.data).name}")
    print(table)
    if a.markdown:
        Path(a.markdown).write_text(table, encoding="utf-8")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(run, indent=1, ensure_ascii=False), encoding="utf-8")
        print(f"results: {a.out}", file=sys.stderr)
    if summary["error"] == summary["total"]:
        print("error: every request failed (is the server up? see the errors above)",
              file=sys.stderr)
        return 1
    return 3 if (a.strict and summary["error"]) else 0


def cmd_report(a: argparse.Namespace) -> int:
    run = load_run(a.results)
    baseline = load_run(a.baseline)["records"] if a.baseline else None
    summary = summarize(run["records"], baseline)
    s = run.get("settings", {})
    print(markdown_report(summary, a.title or f"{s.get('model', '?')} on "
                          f"{Path(str(s.get('data', '?'))).name}"))
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    n, notes = convert(a.format, a.src, a.out, a.video_root, a.answers, a.map, a.category)
    for note in notes:
        print(f"[convert] {note}", file=sys.stderr)
    print(f"[convert] {n} items -> {a.out}", file=sys.stderr)
    return 0 if n else 1


def cmd_synth(a: argparse.Namespace) -> int:
    path = write_synthetic_set(a.out_dir, a.n, a.num_frames, a.size, a.fps, a.seed)
    print(f"[synth] {a.n} questions -> {path}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/accuracy.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="evaluate an OpenAI-compatible endpoint on a JSONL set")
    r.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    r.add_argument("--model", required=True, help="model name the server serves")
    r.add_argument("--data", required=True, help="JSONL of questions (see module doc)")
    r.add_argument("--api-key", default=None, help="bearer token (default $OPENAI_API_KEY)")
    r.add_argument("--video-root", default=None,
                   help="folder relative video paths are under (default: the JSONL's folder)")
    r.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    r.add_argument("--timeout", type=float, default=600.0, help="per-request seconds (600)")
    r.add_argument("--retries", type=int, default=2,
                   help="retries of a failed request (timeouts, connection errors, 429/5xx; "
                        "every attempt's error is recorded) (default 2)")
    r.add_argument("--max-tokens", type=int, default=16, help="max reply tokens (16)")
    r.add_argument("--prompt-suffix", default=PROMPT_SUFFIX, help="instruction after options")
    r.add_argument("--system", default=None, help="optional system message")
    r.add_argument("--extra-body", default=None,
                   help="JSON merged into every request body (e.g. sampling options)")
    r.add_argument("--limit", type=int, default=0, help="only the first N items")
    r.add_argument("--baseline", default=None, help="results JSON of a baseline run")
    r.add_argument("--out", default=None, help="write the run's JSON here")
    r.add_argument("--markdown", default=None, help="also write the markdown table here")
    r.add_argument("--title", default=None)
    r.add_argument("--allow-missing", action="store_true",
                   help="count missing local videos as request errors instead of stopping")
    r.add_argument("--strict", action="store_true", help="exit 3 if any request failed")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_run)
    rp = sub.add_parser("report", help="print the tables of a saved run")
    rp.add_argument("results")
    rp.add_argument("--baseline", default=None)
    rp.add_argument("--title", default=None)
    rp.set_defaults(func=cmd_report)
    c = sub.add_parser("convert", help="public benchmark layout -> JSONL")
    c.add_argument("--format", required=True, choices=["videomme", "mvbench", "nextqa",
                                                       "egoschema"])
    c.add_argument("src", help="videomme: parquet/JSON; mvbench: json/ folder or a task file; "
                               "nextqa: val.csv/test.csv; egoschema: questions.json")
    c.add_argument("out", help="JSONL to write")
    c.add_argument("--video-root", default=None, help="prefix for the video paths written")
    c.add_argument("--answers", default=None, help="egoschema: subset_answers.json")
    c.add_argument("--map", default=None, help="nextqa: map_vid_vidorID.json")
    c.add_argument("--category", default="task_type",
                   help="videomme: field used as category (task_type, duration, domain)")
    c.set_defaults(func=cmd_convert)
    y = sub.add_parser("synth", help="write a synthetic scene-count set (smoke tests)")
    y.add_argument("out_dir")
    y.add_argument("--n", type=int, default=12)
    y.add_argument("--num-frames", type=int, default=16)
    y.add_argument("--size", type=int, default=112)
    y.add_argument("--fps", type=float, default=4.0)
    y.add_argument("--seed", type=int, default=0)
    y.set_defaults(func=cmd_synth)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
