"""benchmarks/accuracy.py: converters, answer-letter extraction, scoring against real HTTP
endpoints.

* converters: the hand-written samples of each public layout (benchmarks/accuracy_samples/)
  against the items written out by hand here;
* extraction: a table of free-text replies and the letter a human reads in them;
* scoring: a real local OpenAI-compatible HTTP server (FastAPI + uvicorn on 127.0.0.1) that
  answers from a script (replies, HTTP errors, a flaky first attempt, a reply slower than the
  timeout); the expected statuses / accuracies are written down from the script, and the
  server checks that every local video arrived as a base64 data URL of the file's bytes;
* one smoke run against a real vLLM server on the tiny Qwen2.5-VL (replies are random; the
  harness's recorded raw replies must equal what the same requests return through the
  official ``openai`` client, and its accuracy must follow from those replies).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request  # module level: the handler's annotation must resolve
from fastapi.responses import JSONResponse

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "benchmarks" / "accuracy_samples"


def _load_module():
    spec = importlib.util.spec_from_file_location("hv_accuracy", ROOT / "benchmarks" /
                                                  "accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hv_accuracy"] = mod
    spec.loader.exec_module(mod)
    return mod


acc = _load_module()


def _read_jsonl(p):
    return [json.loads(l) for l in Path(p).read_text().splitlines() if l.strip()]


# -------------------------------------------------------------------------------------------
# converters
# -------------------------------------------------------------------------------------------
def test_convert_videomme(tmp_path):
    out = tmp_path / "v.jsonl"
    assert acc.main(["convert", "--format", "videomme", str(SAMPLES / "videomme/test.json"),
                     str(out), "--video-root", "/data/vmme"]) == 0
    rows = _read_jsonl(out)
    assert [r["id"] for r in rows] == ["001-1", "001-2", "002-1"]
    assert rows[0]["video"] == "/data/vmme/xx001aaaaaa.mp4"
    assert rows[2]["video"] == "/data/vmme/yy002bbbbbb.mp4"
    assert rows[0]["options"] == ["One.", "Two.", "Three.", "Four."]  # "A. " prefixes gone
    assert [r["answer"] for r in rows] == ["C", "A", "B"]
    assert [r["category"] for r in rows] == ["Counting Problem", "Action Recognition",
                                             "Temporal Reasoning"]
    assert rows[2]["duration"] == "long" and rows[2]["domain"] == "Sports Competition"
    # the other category choice
    out2 = tmp_path / "v2.jsonl"
    acc.main(["convert", "--format", "videomme", str(SAMPLES / "videomme/test.json"),
              str(out2), "--category", "duration"])
    assert [r["category"] for r in _read_jsonl(out2)] == ["short", "short", "long"]


def test_convert_mvbench(tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    assert acc.main(["convert", "--format", "mvbench", str(SAMPLES / "mvbench/json"), str(out),
                     "--video-root", "/mv/video"]) == 0
    rows = _read_jsonl(out)
    assert [r["id"] for r in rows] == ["action_sequence/0", "action_sequence/1",
                                       "scene_transition/0"]
    assert rows[0]["video"] == "/mv/video/star/Charades_v1_480/AB12C.mp4"
    assert rows[2]["video"] == "/mv/video/scene_qa/video/scene_0001.mp4"
    assert rows[0]["answer"] == "B" and rows[1]["answer"] == "D" and rows[2]["answer"] == "B"
    assert rows[1]["options"] == ["Closed the door.", "Took the towel.", "Ate the sandwich.",
                                  "Held the phone."]
    assert (rows[0]["start"], rows[0]["end"]) == (3.5, 12.0) and "start" not in rows[2]
    assert [r["category"] for r in rows] == ["Action Sequence"] * 2 + ["Scene Transition"]
    assert "episodic_reasoning.json: 1 questions skipped" in capsys.readouterr().err


def test_convert_nextqa(tmp_path):
    out = tmp_path / "n.jsonl"
    assert acc.main(["convert", "--format", "nextqa", str(SAMPLES / "nextqa/val.csv"), str(out),
                     "--map", str(SAMPLES / "nextqa/map_vid_vidorID.json"),
                     "--video-root", "/nx/NExTVideo"]) == 0
    rows = _read_jsonl(out)
    assert [r["id"] for r in rows] == ["4010069381_6", "4010069381_2", "7771234567_0"]
    assert rows[0]["video"] == "/nx/NExTVideo/1103/4010069381.mp4"
    assert rows[2]["video"] == "/nx/NExTVideo/0027/7771234567.mp4"
    assert [r["answer"] for r in rows] == ["C", "A", "E"]
    assert rows[2]["options"][4] == "chasing the ball" and len(rows[0]["options"]) == 5
    assert [r["category"] for r in rows] == ["CH", "TN", "CW"]


def test_convert_egoschema(tmp_path, capsys):
    out = tmp_path / "e.jsonl"
    assert acc.main(["convert", "--format", "egoschema", str(SAMPLES / "egoschema/questions.json"),
                     str(out), "--answers", str(SAMPLES / "egoschema/subset_answers.json"),
                     "--video-root", "/ego/videos"]) == 0
    rows = _read_jsonl(out)
    assert [r["id"] for r in rows] == ["00b9a0de-c59e-49cb-a127-6081e2fb8c8e",
                                       "0104f0e6-c53f-4e6b-8b2b-4f2b6f0f1b8a"]
    assert rows[0]["video"] == "/ego/videos/00b9a0de-c59e-49cb-a127-6081e2fb8c8e.mp4"
    assert rows[0]["answer"] == "B" and rows[1]["answer"] == "E"
    assert rows[1]["options"] == ["A hammer.", "A brush.", "A knife.", "A spoon.", "A saw."]
    assert "category" not in rows[0]
    assert "1 questions without a public answer skipped" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--answers"):
        acc.main(["convert", "--format", "egoschema",
                  str(SAMPLES / "egoschema/questions.json"), str(out)])


def test_bad_items_are_clear_errors(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"video": "v.mp4", "question": "q", "options": ["x", "y"], "answer": "C"}\n')
    assert acc.main(["run", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                     "--data", str(p)]) == 2
    assert "answer 'C' is neither a letter within the 2 options" in capsys.readouterr().err
    p.write_text('{"video": "v.mp4", "question": "q", "options": ["x", "y"], "answer": "y"}\n')
    assert acc.main(["run", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                     "--data", str(p)]) == 2
    assert "1 video file(s) not found" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------
# letter extraction
# -------------------------------------------------------------------------------------------
OPTS = ["a dog", "a cat", "a bird", "a fish"]
EXTRACT_TABLE = [
    ("B", "B"), ("(B)", "B"), ("Answer: B.", "B"), ("The answer is B) cat", "B"),
    ("b", "B"), ("(c)", "C"), ("**C**", "C"), ("[B]", "B"), ("answer: d", "D"),
    ("Option D", "D"), ("The answer is (D).", "D"), ("C. a bird", "C"), ("b. a cat", "B"),
    ("B: a cat", "B"), ("B\n\nExplanation: option A is wrong", "B"),
    ("The best option is C, because the bird flies.", "C"),
    ("a cat", "B"), ("the cat, clearly", "B"), ("A cat sits on a mat", "B"),
    ("The correct answer is a bird.", "C"), ("I think B is right", "B"), ("A", "A"),
    ("a)", "A"), ("A is correct", "A"),
    # nothing parseable / ambiguous
    ("", None), ("   ", None), ("I don't know", None), ("Z", None), ("E", None),
    ("B or C", None), ("It is either A or B.", None), ("a dog and a cat", None),
    ("the answer is B, no wait, answer C", None),
]


@pytest.mark.parametrize("text,want", EXTRACT_TABLE)
def test_extract_letter_table(text, want):
    got, method = acc.extract_letter(text, OPTS)
    assert got == want, (text, got, method)
    assert (method == "unparsed") == (want is None)


def test_extract_letter_nested_option_texts():
    opts = ["cat", "black cat", "dog"]
    assert acc.extract_letter("the black cat", opts)[0] == "B"
    assert acc.extract_letter("cat", opts)[0] == "A"
    assert acc.extract_letter("dog and cat", opts)[0] is None
    assert acc.extract_letter(None, opts) == (None, "unparsed")


def test_prompt_format():
    it = acc.Item("1", "v.mp4", "What is shown?", ["a dog", "a cat"], "B")
    assert acc.build_prompt(it) == ("What is shown?\nA. a dog\nB. a cat\n"
                                    "Answer with the option's letter from the given choices "
                                    "directly.")


# -------------------------------------------------------------------------------------------
# scoring against a deterministic local OpenAI-compatible HTTP server
# -------------------------------------------------------------------------------------------
class ScriptedServer:
    """uvicorn + FastAPI ``/v1/chat/completions``: the reply to a question is looked up in
    ``script[question]``, a list of actions taken on successive attempts (the last one
    repeats): ``("reply", text)``, ``("status", code)``, ``("sleep", seconds, text)``.
    Records what arrived (model, auth header, video bytes' sha256, prompt text)."""

    def __init__(self, script):
        from hieravid_vllm.testing.server import free_port

        self.script = script
        self.calls: list[dict] = []
        self.attempts: dict[str, int] = {}
        self.port = free_port()
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            parts = body["messages"][-1]["content"]
            text = next(p["text"] for p in parts if p["type"] == "text")
            url = next(p["video_url"]["url"] for p in parts if p["type"] == "video_url")
            question = text.splitlines()[0]
            video = (hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest()
                     if url.startswith("data:video/mp4;base64,") else url)
            self.calls.append({"question": question, "model": body["model"], "video": video,
                               "auth": request.headers.get("authorization"), "text": text,
                               "max_tokens": body.get("max_tokens")})
            k = self.attempts.get(question, 0)
            self.attempts[question] = k + 1
            actions = self.script[question]
            action = actions[min(k, len(actions) - 1)]
            if action[0] == "status":
                return JSONResponse({"error": {"message": f"scripted {action[1]}"}},
                                    status_code=action[1])
            if action[0] == "sleep":
                await asyncio.sleep(action[1])
                action = ("reply", action[2])
            return {"id": "x", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": action[1]}}],
                    "usage": {"prompt_tokens": 100 + len(text), "completion_tokens": 1,
                              "total_tokens": 101 + len(text)}}

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("scripted server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


# (id, category, answer, script, expected status, expected attempts with --retries 1)
CASES = [
    ("q1", "count", "B", [("reply", "B")], "correct", 1),
    ("q2", "count", "C", [("reply", "The answer is (C).")], "correct", 1),
    ("q3", "count", "A", [("reply", "B) a dog")], "wrong", 1),
    ("q4", "count", "D", [("reply", "I cannot tell from the video.")], "unparsed", 1),
    ("q5", "order", "B", [("reply", "")], "unparsed", 1),
    ("q6", "order", "A", [("status", 500)], "error", 2),
    ("q7", "order", "C", [("status", 503), ("reply", "c")], "correct", 2),
    ("q8", "order", "B", [("sleep", 4.0, "B")], "error", 2),
    ("q9", "order", "A", [("status", 400)], "error", 1),
    ("q10", "order", "D", [("reply", "It is a fish swimming.")], "correct", 1),
]
OPTIONS = ["a dog", "a cat", "a bird", "a fish"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from hieravid_vllm.testing.video import write_scene_video

    d = tmp_path_factory.mktemp("acc-videos")
    a = write_scene_video(d / "a.mp4", num_frames=4, width=32, height=32, num_scenes=1, seed=1)
    b = write_scene_video(d / "b.mp4", num_frames=4, width=32, height=32, num_scenes=2, seed=2)
    return d, {"a.mp4": hashlib.sha256(a.path.read_bytes()).hexdigest(),
               "b.mp4": hashlib.sha256(b.path.read_bytes()).hexdigest()}


def _write_set(path: Path):
    with open(path, "w") as f:
        for k, (qid, cat, ans, *_rest) in enumerate(CASES):
            f.write(json.dumps({"id": qid, "video": "a.mp4" if k % 2 == 0 else "b.mp4",
                                "question": f"Question {qid}: what is shown?",
                                "options": OPTIONS, "answer": ans, "category": cat}) + "\n")


def test_scoring_against_scripted_endpoint(clips, tmp_path, capsys):
    vid_dir, sha = clips
    data = vid_dir / "set.jsonl"  # relative video paths resolve against the JSONL's folder
    _write_set(data)
    script = {f"Question {c[0]}: what is shown?": c[3] for c in CASES}
    # baseline run (hand-written): correct on everything except q3, q4 -> 8/10
    base = {"records": [{"id": c[0], "category": c[1],
                         "status": "wrong" if c[0] in ("q3", "q4") else "correct"}
                        for c in CASES]}
    base_path = tmp_path / "base.json"
    base_path.write_text(json.dumps(base))
    out, md = tmp_path / "run.json", tmp_path / "run.md"
    with ScriptedServer(script) as srv:
        t0 = time.time()
        rc = acc.main(["run", "--base-url", srv.base_url, "--model", "scripted-model",
                       "--api-key", "sekrit", "--data", str(data), "--concurrency", "4",
                       "--timeout", "1.5", "--retries", "1", "--max-tokens", "7",
                       "--baseline", str(base_path), "--out", str(out), "--markdown", str(md)])
        wall = time.time() - t0
        calls = list(srv.calls)
    assert rc == 0
    assert wall < 30
    run = json.loads(out.read_text())
    recs = {r["id"]: r for r in run["records"]}
    assert [r["id"] for r in run["records"]] == [c[0] for c in CASES]  # item order kept
    for qid, cat, ans, _script, status, attempts in CASES:
        r = recs[qid]
        assert (r["status"], r["attempts"], r["category"]) == (status, attempts, cat), r
        assert (r["error"] is None) == (status != "error"), r
    assert recs["q6"]["attempt_errors"] == ["HTTP 500: {\"error\":{\"message\":\"scripted 500\"}}"] * 2
    assert recs["q8"]["error"].startswith("timeout after 1.5 s")
    assert recs["q9"]["error"].startswith("HTTP 400")
    assert recs["q7"]["attempt_errors"][0].startswith("HTTP 503") and recs["q7"]["error"] is None
    assert recs["q4"]["response"] == "I cannot tell from the video."
    assert recs["q10"]["method"] == "option_text" and recs["q10"]["extracted"] == "D"
    # every request carried the right video bytes, model, key, prompt
    assert len(calls) == sum(c[5] for c in CASES)
    for c in calls:
        k = [x[0] for x in CASES].index(c["question"].split()[1].rstrip(":"))
        assert c["video"] == sha["a.mp4" if k % 2 == 0 else "b.mp4"]
        assert c["model"] == "scripted-model" and c["auth"] == "Bearer sekrit"
        assert c["max_tokens"] == 7
        assert c["text"].endswith("A. a dog\nB. a cat\nC. a bird\nD. a fish\n"
                                  "Answer with the option's letter from the given choices "
                                  "directly.")
    s = run["summary"]
    # hand count: correct q1 q2 q7 q10; wrong q3; unparsed q4 q5; errors q6 q8 q9
    assert (s["correct"], s["wrong"], s["unparsed"], s["error"], s["total"]) == (4, 1, 2, 3, 10)
    assert s["accuracy"] == pytest.approx(0.4)
    assert s["retried"] == 3  # q6, q7, q8
    assert s["per_category"]["count"] == {"n": 4, "accuracy": pytest.approx(0.5)}
    assert s["per_category"]["order"] == {"n": 6, "accuracy": pytest.approx(2 / 6)}
    b = s["baseline"]
    assert b["accuracy_baseline"] == pytest.approx(0.8)
    assert b["relative_pct"] == pytest.approx(50.0)  # 0.4 / 0.8 * 100
    assert b["per_category"]["count"]["relative_pct"] == pytest.approx(0.5 / 0.5 * 100)
    assert b["per_category"]["order"]["relative_pct"] == pytest.approx((2 / 6) / 1.0 * 100)
    assert sorted(e["id"] for e in s["errors_list"]) == ["q6", "q8", "q9"]
    table = md.read_text()
    assert "| **all** | 10 | 4 | 40.0 | 80.0 | 50.0 |" in table
    assert "| count | 4 | 2 | 50.0 | 50.0 | 100.0 |" in table
    assert "| order | 6 | 2 | 33.3 | 100.0 | 33.3 |" in table
    assert "unparsed 2 (counted wrong), request errors 3 (counted wrong), retried 3" in table
    assert "error `q9`: HTTP 400" in table
    err = capsys.readouterr().err
    assert "item q6: HTTP 500" in err and "item q8: timeout" in err
    # the report sub-command re-prints the same numbers from the saved files
    assert acc.main(["report", str(out), "--baseline", str(base_path)]) == 0
    assert "| **all** | 10 | 4 | 40.0 | 80.0 | 50.0 |" in capsys.readouterr().out


def test_all_requests_failing_exit_code(clips, tmp_path):
    from hieravid_vllm.testing.server import free_port

    vid_dir, _ = clips
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"video": str(vid_dir / "a.mp4"), "question": "q?",
                                "options": ["x", "y"], "answer": "A"}) + "\n")
    port = free_port()  # nothing listens there: connection refused, retried, reported
    rc = acc.main(["run", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m",
                   "--data", str(data), "--retries", "0", "--no-progress",
                   "--out", str(tmp_path / "r.json")])
    assert rc == 1
    rec = json.loads((tmp_path / "r.json").read_text())["records"][0]
    assert rec["status"] == "error" and "ConnectError" in rec["error"]


# -------------------------------------------------------------------------------------------
# smoke: a real vLLM server (tiny random-weight Qwen2.5-VL)
# -------------------------------------------------------------------------------------------
@pytest.mark.vllm
def test_real_vllm_smoke(tmp_path):
    from hieravid_vllm.testing.models import build_tiny_model
    from hieravid_vllm.testing.server import VLLMServer
    from hieravid_vllm.testing.video import write_scene_video

    model = build_tiny_model("qwen2_5_vl")
    for k in range(2):
        write_scene_video(tmp_path / f"v{k}.mp4", num_frames=8, width=56, height=56, fps=4.0,
                          num_scenes=2, seed=k)
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{k}", "video": f"v{k}.mp4",
                                        "question": "Which shape moves?",
                                        "options": ["circle", "square", "triangle"],
                                        "answer": "ABC"[k]}) + "\n" for k in range(2)))
    out = tmp_path / "run.json"
    server = VLLMServer(model, video_fps=4.0, max_model_len=2048,
                        log_path=tmp_path / "vllm.log").start()
    try:
        rc = acc.main(["run", "--base-url", server.base_url, "--model", server.model_name,
                       "--data", str(data), "--concurrency", "2", "--timeout", "300",
                       "--max-tokens", "6", "--out", str(out), "--no-progress"])
        run = json.loads(out.read_text())
        client = server.client()
        direct = []
        for it in acc.load_items(data):
            r = client.chat.completions.create(
                model=server.model_name, max_tokens=6, temperature=0.0,
                messages=acc.build_messages(it, str(tmp_path / it.video)))
            direct.append((r.choices[0].message.content, r.usage.prompt_tokens))
    finally:
        server.stop()
    assert rc == 0
    recs = run["records"]
    assert all(r["status"] != "error" for r in recs), recs
    assert [(r["response"], r["prompt_tokens"]) for r in recs] == direct
    # 8 frames of 56x56 at temporal patch 2: 4 x 2 x 2 = 16 video tokens in the prompt
    assert all(r["prompt_tokens"] > 16 for r in recs)
    letters = [acc.extract_letter(r["response"], ["circle", "square", "triangle"])[0]
               for r in recs]
    assert run["summary"]["correct"] == sum(l == a for l, a in zip(letters, "AB"))
    assert run["summary"]["unparsed"] == sum(l is None for l in letters)


def test_synthetic_set_ground_truth(tmp_path):
    """The synth set's answers are the scene counts a frame-difference detector finds."""
    from hieravid_vllm.testing.video import detect_cuts, read_video_frames

    assert acc.main(["synth", str(tmp_path), "--n", "4", "--num-frames", "12",
                     "--size", "64"]) == 0
    items = acc.load_items(tmp_path / "synthetic.jsonl")
    assert [it.answer for it in items] == ["A", "B", "C", "D"]
    for it in items:
        cuts = detect_cuts(read_video_frames(tmp_path / it.video))
        assert acc.LETTERS[len(cuts)] == it.answer and it.options == ["1", "2", "3", "4"]
