"""The bundled tiny reasoner: its task's determinism and scoring, and the shipped model and data."""

from __future__ import annotations

import json
import random

import pytest

from sgl_merge.tiny_reasoner import HELDOUT, MODEL_DIR, parts, task


def test_dataset_is_deterministic():
    a = task.make_dataset(50, seed=3)
    assert a == task.make_dataset(50, seed=3)
    assert a != task.make_dataset(50, seed=4)
    assert task.make_problem(random.Random(9)) == task.make_problem(random.Random(9))


def test_thinking_chain_computes_the_answer():
    for p in task.make_dataset(200, seed=1):
        lines = p["thinking"].split("\n")
        assert task.MIN_STEPS <= len(lines) <= task.MAX_STEPS
        x = int(p["question"].split("Start at ")[1].split(".")[0])
        for k, line in enumerate(lines, 1):
            idx, expr = line.split(":")
            lhs, rhs = expr.split("=")
            assert int(idx) == k and int(lhs[0]) == x and f" {k}:{lhs[1:]}" in p["question"]
            x = eval(lhs) % task.MODULUS
            assert int(rhs) == x
        assert p["answer"] == str(x)


def test_parts_problems_are_four_independent_chains_answered_together():
    for p in task.make_dataset(100, seed=2, make=parts.make_problem):
        lines = p["thinking"].split("\n")
        assert len(lines) == len(parts.PARTS) * parts.STEPS
        finals = []
        for label in parts.PARTS:
            x = int(p["question"].split(f"{label}=")[1].split(":")[0])
            for k, line in enumerate((ln for ln in lines if ln.startswith(label)), 1):
                head, expr = line.split(":")
                lhs, rhs = expr.split("=")
                assert head == f"{label}{k}" and int(lhs[0]) == x
                x = eval(lhs) % task.MODULUS
                assert int(rhs) == x
            finals.append(str(x))
        assert p["answer"] == ",".join(finals)
    p = parts.make_problem(random.Random(0))
    assert task.training_text(p).endswith(f"</think>\n\\boxed{{{p['answer']}}}<|im_end|>")
    assert parts.is_correct(f"\\boxed{{{p['answer']}}}", p["answer"])
    assert not parts.is_correct("\\boxed{" + p["answer"][:-1] + str((int(p["answer"][-1]) + 1) % 10) + "}", p["answer"])


def test_training_text_has_the_answer_right_after_think():
    p = task.make_problem(random.Random(0))
    text = task.training_text(p)
    assert text.startswith(f"<|im_start|>user\n{p['question']}<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert text.endswith(f"{p['thinking']}\n</think>\n\\boxed{{{p['answer']}}}<|im_end|>")
    assert task.prompt_messages(p["question"]) == [{"role": "user", "content": p["question"]}]


@pytest.mark.parametrize("text, expected", [
    ("<think>\n1:3+4=7\n</think>\n\\boxed{7}", "7"),
    ("\\boxed{1} then \\boxed{ 42 }", "42"),
    ("no box here", None),
    ("\\boxed{}", ""),
])
def test_extract_answer(text, expected):
    assert task.extract_answer(text) == expected


def test_is_correct():
    assert task.is_correct("</think>\n\\boxed{3}<|im_end|>", "3")
    assert task.is_correct("\\boxed{03}", "3")
    assert not task.is_correct("\\boxed{4}", "3")
    assert not task.is_correct("</think>\n3", "3")
    assert not task.is_correct("\\boxed{x}", "3")


def test_shipped_model_directory():
    files = {f.name for f in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "special_tokens_map.json"} <= files
    size = sum(f.stat().st_size for f in MODEL_DIR.iterdir() if f.is_file())
    assert size <= 10 * 1024 * 1024
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    assert "chat_template" in json.loads((MODEL_DIR / "tokenizer_config.json").read_text())


def test_shipped_model_is_a_tiny_parathinker_whose_plain_requests_run_the_base_computation():
    """The second training stage (`scripts/train_tiny_parathinker.py`): ParaThinker's control tokens
    and per-layer segment embeddings, with segment 0 (prompt, plain `<think>` traces, summary) held
    at zero, so single / vote / ThinkMerge requests compute what a plain Qwen2 of the weights does."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["max_segments"] == 9
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    for text in ("<think1>", "</think8>", "<summary>", "</summary>"):
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == 1, text
    weights = load_file(str(MODEL_DIR / "model.safetensors"))
    tables = [w for name, w in weights.items() if name.endswith("self_attn.seg_embeddings.weight")]
    assert len(tables) == config["num_hidden_layers"]
    assert all(t.shape[0] == 9 and not t[0].any() and t[1:].abs().sum() > 0 for t in tables)
    meta = json.loads((MODEL_DIR / "sgl_merge_tiny_reasoner.json").read_text())
    para = meta["eval"]["summary_parts"]
    assert para["summary@8"] > para["vote@8"]  # the summary reads 8 paths better than their vote


def test_shipped_model_loads_and_answers_in_format():
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = Qwen2ForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    for t in ("<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    p = task.load_heldout()[0]
    prompt = tok.apply_chat_template(task.prompt_messages(p["question"]), tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == task.prompt_text(p["question"])
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=80, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:])
    assert text.startswith("<think>\n1:") and "</think>\n\\boxed{" in text
    assert task.extract_answer(text) is not None


def test_shipped_heldout():
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines()]
    assert len(rows) == 300
    assert all(set(r) == {"question", "answer"} for r in rows)
    assert len({r["question"] for r in rows}) == 300
    assert rows == [{"question": p["question"], "answer": p["answer"]} for p in task.make_heldout()]
    # Disjoint from training by construction: the training stream skips these questions; and
    # the task's own default training seed happens not to produce them anyway.
    train = {p["question"] for p in task.make_dataset(5000, seed=task.TRAIN_SEED)}
    assert not train & {r["question"] for r in rows}


def test_shipped_parts_heldout():
    rows = [json.loads(line) for line in parts.HELDOUT.read_text().splitlines()]
    assert len(rows) == parts.HELDOUT_SIZE == 200 and len({r["question"] for r in rows}) == 200
    assert rows == [{"question": p["question"], "answer": p["answer"]} for p in parts.make_heldout()]
    assert not {r["question"] for r in rows} & {r["question"] for r in task.load_heldout()}


def test_shipped_model_thinks_through_every_part():
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = Qwen2ForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    p = task.load_heldout(parts.HELDOUT)[0]
    enc = tok(task.prompt_text(p["question"]), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=160, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:])
    assert text.startswith("<think>\nA1:") and "D3:" in text
    assert parts.is_correct(text, p["answer"])  # greedy decoding is right (the uncertainty is in sampling)
