"""A small byte-level BPE tokenizer in the Qwen2 style, trained locally (no model hub).

Same pipeline as the Qwen2 tokenizers the real checkpoints ship (NFC normaliser, Qwen's split
regex, byte-level BPE, byte-level decoder), trained with the ``tokenizers`` library on a
generated English corpus about videos. Special tokens are added whole (one id each), in the
order of :data:`QWEN_SPECIAL_TOKENS` (plus any extras), right after the trained vocabulary's
first ids: ``<|endoftext|>`` is id 0.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
LLAVA_EXTRA_SPECIAL_TOKENS = ("<image>", "<video>")

# Qwen2's pre-tokenisation regex (the one in Qwen2-VL's tokenizer.json).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SUBJECTS = ["a red circle", "the blue square", "a green triangle", "the yellow ball",
             "a small car", "the person", "a dog", "the camera", "two birds", "the white cube",
             "a purple shape", "the background", "an orange box", "the scene", "a large truck"]
_VERBS = ["moves", "slides", "jumps", "rotates", "stays", "appears", "disappears", "bounces",
          "turns", "runs", "falls", "rises", "waits", "changes", "fades"]
_PLACES = ["to the left", "to the right", "across the frame", "near the top", "at the bottom",
           "in the middle", "behind the wall", "over the road", "into the shadow",
           "out of view", "along the edge", "between the trees"]
_TIMES = ["at the start", "after a cut", "in the second scene", "at the end",
          "during the first shot", "for 3 seconds", "while the camera pans", "suddenly", "slowly"]
_QUESTIONS = [
    "Describe the video in detail.", "What happens in this video?",
    "How many scenes does the clip contain?", "Which object moves fastest?",
    "What color is the background in the first scene?", "Summarize the clip in one sentence.",
    "Is there a scene change? When?", "What is shown in the image?",
    "Answer the question about the video: where does the ball go?",
    "You are a helpful assistant.", "Picture 1:", "Video 1:", "The answer is yes.",
    "The answer is no.", "I cannot tell from the frames.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 100 2024.",
    "Punctuation: , . ; : ! ? ( ) [ ] { } \" ' - _ / \\ * + = < > | # @ & % $",
]


def training_corpus() -> list[str]:
    """Deterministic sentences covering the words tests and demos use."""
    lines = list(_QUESTIONS)
    for s, v, p, t in itertools.islice(itertools.product(_SUBJECTS, _VERBS, _PLACES, _TIMES),
                                       0, None, 7):
        lines.append(f"{s[0].upper()}{s[1:]} {v} {p} {t}.")
    return lines


def train_tokenizer(out_dir: str | Path, vocab_size: int = 1024,
                    extra_special_tokens: Sequence[str] = (), chat_template: str | None = None):
    """Train the tokenizer, save it to ``out_dir`` (tokenizer.json + tokenizer_config.json,
    class ``Qwen2Tokenizer``) and return the loaded transformers tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = list(QWEN_SPECIAL_TOKENS) + [t for t in extra_special_tokens
                                             if t not in QWEN_SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_corpus(), trainer)
    raw = out_dir / "_raw_tokenizer.json"
    tok.save(str(raw))
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(raw), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:], model_max_length=131072,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(out_dir))
    raw.unlink()
    # Declare the class real Qwen2 checkpoints use (loads the same tokenizer.json).
    import json

    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["clean_up_tokenization_spaces"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return AutoTokenizer.from_pretrained(str(out_dir))
