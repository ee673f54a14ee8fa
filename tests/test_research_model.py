"""The bundled tiny research model (`sgl_merge/research/model/`, trained by
`scripts/train_tiny_researcher.py`): it loads with transformers, its tokenizer speaks the agent's
layout, its training record holds the run and its check, and its system prompt fits the agent.
Fast: no server."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import pytest
import torch

from sgl_merge.research import synthetic as syn
from sgl_merge.research.agent import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    CALL_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    AgentConfig,
    first_turn,
    render_system,
    response_turn,
)
from sgl_merge.research.search import LocalCorpus, SearchTool
from sgl_merge.research.tools import Toolset

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "sgl_merge" / "research" / "model"
RECORD = MODEL_DIR / "sgl_merge_tiny_researcher.json"
SYSTEM_PROMPT = MODEL_DIR / "system_prompt.txt"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def toolset():
    return Toolset([SearchTool(LocalCorpus(syn.CORPUS), top_k=2)])


def test_model_loads_with_transformers(tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["max_position_embeddings"] >= 1024
    assert config["vocab_size"] == len(tok)
    ids = tok("<|im_start|>user\nWhat is the founder of Ragul?<|im_end|>", return_tensors="pt",
              add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    assert (MODEL_DIR / "chat_template.jinja").is_file()


def test_layout_tokens(tok):
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", THINK_OPEN, THINK_CLOSE):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [special], special
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    close = tok.convert_tokens_to_ids(THINK_CLOSE)
    assert close in tok(f"\n{THINK_CLOSE}\n\n", add_special_tokens=False)["input_ids"]
    # Every piece of a trajectory round-trips through the tokenizer.
    call = json.dumps({"name": "search", "arguments": {"query": ["Ragul founded"]}})
    pieces = [first_turn("sys", "What is the birthplace of the founder of Ragul?"), f"{THINK_OPEN}\n",
              "need the founder of Ragul", f"\n{THINK_CLOSE}\n\n", f"{CALL_OPEN}\n", call,
              response_turn("A search for 'Ragul founded' found 2 results:"), ANSWER_OPEN, f"Viren{ANSWER_CLOSE}"]
    for piece in pieces:
        assert tok.decode(tok(piece, add_special_tokens=False)["input_ids"]) == piece
    # The decision's two openings start with different tokens (the agent's regex picks one).
    first = {tok(t, add_special_tokens=False)["input_ids"][0] for t in (f"{CALL_OPEN}\n", ANSWER_OPEN)}
    assert len(first) == 2


def test_training_record():
    record = json.loads(RECORD.read_text())
    for key in ("seed", "steps", "batch_size", "lr", "slip", "train_minutes", "final_loss", "params", "top_k",
                "system_prompt", "world_seeds", "grammar"):
        assert key in record, key
    assert record["top_k"] == 2 and record["steps"] > 0 and record["train_minutes"] > 0
    for stage in record.get("earlier_stages", []):
        assert stage["steps"] > 0 and "final_loss" in stage and "seed" in stage
    assert syn.WORLD_SEED not in record["world_seeds"]  # never trained on the shipped world
    check = record["check"]
    for key in ("questions", "temperature", "greedy_acc", "single_sampled_acc"):
        assert key in check, key
    assert 0 <= check["single_sampled_acc"] <= 1 and 0 <= check["greedy_acc"] <= 1
    assert record["system_prompt"] == SYSTEM_PROMPT.read_text()


def test_system_prompt_formats(toolset):
    template = SYSTEM_PROMPT.read_text()
    text = template.format(tools="TOOLS", date="2026-01-01")
    assert text and len(text) < 400
    rendered = render_system(template, toolset)
    tools = "\n".join(json.dumps(d, ensure_ascii=False) for d in toolset.definitions())
    assert rendered == template.format(tools=tools, date=datetime.date.today().isoformat())
    AgentConfig(system_prompt=template)  # the agent takes it


def test_greedy_first_step_searches_the_question_subject(tok, toolset):
    """The model's greedy first step, in the agent's layout, thinks of the question's first hop and
    calls search with the subject's name and the relation's keyword."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "scripts"))
    from train_tiny_researcher import LocalAgent

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    agent = LocalAgent(model, tok, toolset, render_system(SYSTEM_PROMPT.read_text(), toolset))
    problems = syn.load_questions()[:4]
    prompts = [agent.enc.prefix(p["question"]) + agent.enc.think_open for p in problems]
    thoughts = agent._gen(prompts, agent.think_tokens, 0.0, stop={agent.enc.close_id})
    for p, th in zip(problems, thoughts):
        hop = p["hops"][0]
        assert tok.decode(th) == f"need the {hop['relation']} of {hop['subject']}{THINK_CLOSE}"
