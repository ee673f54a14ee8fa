"""Small deterministic models for tests, examples and benchmarks: no model hub needed.

`build_tiny_model(path)` writes a Hugging Face model directory that SGLang loads like any other:
a randomly initialised Qwen2 causal LM (seeded, so every build is bit-identical), a real byte-level
BPE tokenizer trained on a fixed corpus, `<think>` / `</think>` as special tokens and a ChatML chat
template. It takes a fraction of a second, so every test session builds its own.
`build_tiny_parathinker(path)` adds ParaThinker's control tokens and segment embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

from sgl_merge.contract.parathink_layout import SUMMARY_CLOSE, SUMMARY_OPEN, THINK_CLOSE, THINK_OPEN, control_tokens

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", THINK_OPEN, THINK_CLOSE]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if opens_think %}<think>\n{% endif %}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Think step by step, then answer: what is 12 + 30? The answer is 42.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Merge groups decode in lockstep; every branch keeps its own context.",
    "Question: sort the list [3, 1, 2]. Answer: [1, 2, 3]. \\boxed{6}",
    '{"action": "search", "query": "logit averaging"} {"action": "answer", "text": "yes"}',
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" # % & _ | ~ ^ `",
]


def _build_tokenizer(vocab_size: int, think_tokens: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS if think_tokens else SPECIAL_TOKENS[:3],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok


def build_tiny_model(
    path: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 384,
    init_std: float = 0.2,
    opens_think: bool = False,
    think_tokens: bool = True,
    extra_special_tokens: list[str] = (),
) -> Path:
    """Write a small random Qwen2 model directory at `path` and return it.

    `init_std` is larger than a trained model's so next-token distributions are peaked: greedy
    decoding then has clear winners, which keeps exactness tests meaningful across kernels.
    `opens_think=True` makes the chat template open `<think>` itself (as Qwen3-style templates do);
    `think_tokens=False` leaves `<think>` / `</think>` out of the vocabulary (a non-thinking model).
    """
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_build_tokenizer(vocab_size, think_tokens),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=([THINK_OPEN, THINK_CLOSE] if think_tokens else []) + list(extra_special_tokens),
    )
    tok.chat_template = CHAT_TEMPLATE.replace("opens_think", "true" if opens_think else "false")
    tok.save_pretrained(path)

    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    (path / "sgl_merge_tiny.json").write_text(json.dumps({"seed": seed, "init_std": init_std}))
    return path


def build_tiny_parathinker(path: str | Path, *, paths: int = 4, seed: int = 0, init_std: float = 0.2) -> Path:
    """A small checkpoint in ParaThinker's layout: the tiny Qwen2 above, its tokenizer with
    `<think1>`..`<thinkN>`, `</think1>`..`</thinkN>`, `<summary>`, `</summary>`, and per layer
    `model.layers.{i}.self_attn.seg_embeddings.weight` [max_segments, head_dim] (random, so that
    segments change the outputs), with `max_segments` in config.json."""
    import torch
    from safetensors.torch import load_file, save_file

    controls = [t for t in control_tokens(paths) if t != SUMMARY_OPEN] + [SUMMARY_OPEN, SUMMARY_CLOSE]
    path = build_tiny_model(path, seed=seed, init_std=init_std, extra_special_tokens=controls)
    config = json.loads((path / "config.json").read_text())
    config["max_segments"] = paths + 1
    (path / "config.json").write_text(json.dumps(config, indent=2))
    weights_file = path / "model.safetensors"
    weights = load_file(str(weights_file))
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    generator = torch.Generator().manual_seed(seed + 1)
    for layer in range(config["num_hidden_layers"]):
        weights[f"model.layers.{layer}.self_attn.seg_embeddings.weight"] = (
            torch.randn(paths + 1, head_dim, generator=generator) * init_std)
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    return path
