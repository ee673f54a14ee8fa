"""Train the tiny research model (`sgl_merge/research/model/`): a small Qwen2 that runs the research
agent's loop (`sgl_merge.research.agent`) on the synthetic multi-hop task (`sgl_merge.research.synthetic`),
so the demo can measure single vs vote@k vs merge@k on a research task.

What it is trained on: gold trajectories in the agent's exact token layout with `history="shared"`,
one training sequence per step. A step's sequence is what the agent builds for it: the first turn
(system prompt, question), every past step as `<tool_call>\\n{json}` plus `response_turn(observation)`
(no past thinking: the shared history drops it), then `<think>\\n`, this step's thinking, the closing
`\\n</think>\\n\\n` and the decision. Each piece is tokenized on its own, as the agent tokenizes it.
Loss: the thinking, `</think>` right after it (the agent stops thinking on that token and appends
its own `\\n</think>\\n\\n`), and the decision (`<tool_call>\\n` + the call's JSON, or `<answer>` +
`NAME</answer>`). The observations are the real tool's: `SearchTool(LocalCorpus(corpus), top_k=2)`
on the training world's corpus, for the query the step makes.

A step's thinking names the entity to look up and the call copies it:

    need the founder of Ragul        -> {"name": "search", "arguments": {"query": ["Ragul founded"]}}
    the answer is Viren              -> <answer>Viren</answer>

The call's JSON is exactly what the server's grammar forces: xgrammar's JSON-schema grammar with
`any_whitespace=False` (`--constrained-json-disable-any-whitespace`) uses the separators ", " and
": ", the properties in the schema's order, i.e. `json.dumps(call)` (checked at start with xgrammar
when it is installed).

Slips. In a fraction `--slip` of the thinkings the name is written with its twin's one-vowel change
(the distractor page, "Rugul" for "Ragul"), and the trajectory goes on from what that search really
returns (the twin's facts), to a wrong answer. So the model puts about that much probability on a
changed vowel where it writes a name: greedy decisions follow the true name, a sampled thinking
slips now and then and a single trajectory then follows the twin, while merging K branches' calls
(their logits averaged) mostly writes the true name again.

Training questions come from worlds of other seeds than the shipped one (`--world-seeds`), split
"train", so neither the held-out questions nor the shipped world's facts are seen. The tokenizer is
a byte-level BPE with the tiny reasoner's recipe and special tokens (`<|endoftext|>`,
`<|im_start|>`, `<|im_end|>`, `<think>`, `</think>`), trained on training-world trajectories.

Check (in the record): on held-out questions of the shipped corpus, the agent's loop run here in
transformers against the real tool, no server: greedy, one sampled trajectory at the thinking
temperature, vote@k over k sampled trajectories, and merge@k (k sampled thinkings per step, each
decision sampled from their averaged log-probabilities).

The shipped model is three runs of this script (48 minutes on one thread of the project's 2-core
CPU; the first alone, 22.5 minutes, left greedy at 0.18, the second at 0.52: names were not yet
copied reliably; the record keeps every stage):

    python scripts/train_tiny_researcher.py --out /tmp/stage1            # from scratch, seed 0
    python scripts/train_tiny_researcher.py --init-from /tmp/stage1 --out /tmp/stage2 --seed 1 \
        --steps 1200 --minutes 15 --lr 1e-3 --warmup 20
    python scripts/train_tiny_researcher.py --init-from /tmp/stage2 --seed 2 --steps 800 \
        --minutes 10.5 --lr 5e-4 --warmup 10                             # writes sgl_merge/research/model
    python scripts/train_tiny_researcher.py --eval-only      # re-run the check on the shipped model

Besides the step's targets, each sequence carries a lighter next-token loss on its history
(`--history-weight`): the pages and calls repeat names, so this teaches copying names, without
which the model cannot follow a chain (without it, a 19-minute run left even the call not copying the
thinking's name).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch

from _training import add_run_args, add_shape_args, parse_args, train
from sgl_merge.research import synthetic as syn
from sgl_merge.research.agent import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    CALL_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    first_turn,
    render_system,
    response_turn,
)
from sgl_merge.research.search import LocalCorpus, SearchTool
from sgl_merge.research.tools import Toolset
from sgl_merge.tiny_models import CHAT_TEMPLATE, SPECIAL_TOKENS

MODEL_DIR = ROOT / "sgl_merge" / "research" / "model"
RECORD = "sgl_merge_tiny_researcher.json"
SYSTEM_PROMPT_FILE = "system_prompt.txt"
# The system prompt the model is trained with (AgentConfig.system_prompt): short, no tool list.
SYSTEM_PROMPT = ("Answer the question by searching the wiki, one fact per search. "
                 "Give the final answer in <answer></answer>.")
TOP_K = 2
CLOSING = f"\n{THINK_CLOSE}\n\n"


def thinking_search(relation: str, name: str) -> str:
    return f"need the {relation} of {name}"


def thinking_answer(name: str) -> str:
    return f"the answer is {name}"


def call_text(call: dict) -> str:
    """The bytes the server's grammar forces for a call (xgrammar, any_whitespace=False)."""
    return json.dumps(call)


def search_call(name: str, relation: str) -> dict:
    return {"name": "search", "arguments": {"query": [f"{name} {syn.KEYWORDS[relation]}"]}}


# --- trajectories ---------------------------------------------------------------------------------


def trajectory(problem: dict, world: syn.World, tools: Toolset, rng: random.Random, slip: float) -> dict:
    """A run of the agent on `problem` with slips drawn at rate `slip`: its steps ({"thinking",
    "call", "observation"} for searches, {"thinking", "answer"} last), whether it slipped, and
    whether every search's first hit showed the fact the next step reads (else it is not used)."""
    subject = problem["hops"][0]["subject"]
    steps, slipped, clean = [], False, True
    for hop in problem["hops"]:
        relation = hop["relation"]
        name = subject
        if rng.random() < slip:
            name, slipped = world.entity(subject).twin, True
        call = search_call(name, relation)
        obs = tools.call("search", call["arguments"])
        value = world.entity(name).facts[relation]
        fact = syn.SENTENCES[relation].format(s=name, v=value)
        first_hit = obs.text.split("\n\n2. ")[0]
        clean = clean and obs.ok and fact in first_hit
        steps.append({"thinking": thinking_search(relation, name), "call": call, "observation": obs.text})
        subject = value
    name = subject
    if rng.random() < slip:
        name, slipped = world.entity(subject).twin, True
    steps.append({"thinking": thinking_answer(name), "answer": name})
    return {"question": problem["question"], "steps": steps, "slipped": slipped, "clean": clean,
            "correct": name == problem["answer"]}


def training_worlds(seeds: list[int], questions: int, seed: int, slip: float, log=print) -> list[dict]:
    """Trajectories of `questions` train-split questions per world, with slips."""
    rng = random.Random(seed)
    out = []
    for ws in seeds:
        world = syn.make_world(ws)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "corpus.jsonl"
            syn.write_corpus(path, world)
            tools = Toolset([SearchTool(LocalCorpus(path), top_k=TOP_K)])
            problems = syn.make_questions(world, questions, seed * 1000 + ws, split="train")
            trajs = [trajectory(p, world, tools, rng, slip) for p in problems]
        kept = [t for t in trajs if t["clean"]]
        log(f"world {ws}: {len(kept)}/{len(trajs)} trajectories kept, "
            f"{sum(t['slipped'] for t in kept)} with a slip", flush=True)
        out += kept
    return out


# --- tokens ---------------------------------------------------------------------------------------


class Encoder:
    """Token ids of the agent's pieces, each tokenized on its own as the agent does."""

    def __init__(self, tok, system: str):
        self.tok = tok
        self.system = system
        self.close_id = tok.convert_tokens_to_ids(THINK_CLOSE)
        self.think_open = self.ids(f"{THINK_OPEN}\n")
        self.closing = self.ids(CLOSING)

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prefix(self, question: str) -> list[int]:
        return self.ids(first_turn(self.system, question))

    def past_step(self, call_json: str, observation: str) -> list[int]:
        return self.ids(f"{CALL_OPEN}\n{call_json}") + self.ids(response_turn(observation))

    def examples(self, traj: dict) -> list[tuple[list[int], list[int], list[int]]]:
        """One (input ids, targets, history targets) per step; targets[p] is what position p must
        predict (-100: none): the thinking, </think> and the decision. History targets are the next
        tokens of the history (the question, past calls, observations): an auxiliary language-model
        loss that teaches the model to copy names (the page repeats the searched name, a call
        repeats the name read before it) long before the main targets alone would."""
        history = self.prefix(traj["question"])
        out = []
        for step in traj["steps"]:
            ctx = history + self.think_open
            think = self.ids(step["thinking"])
            if "call" in step:
                decision = self.ids(f"{CALL_OPEN}\n") + self.ids(call_text(step["call"]))
            else:
                decision = self.ids(ANSWER_OPEN) + self.ids(f"{step['answer']}{ANSWER_CLOSE}")
            seq = ctx + think + self.closing + decision
            tgt = [-100] * len(seq)
            for p in range(len(ctx) - 1, len(ctx) + len(think) - 1):
                tgt[p] = seq[p + 1]
            tgt[len(ctx) + len(think) - 1] = self.close_id  # the model stops thinking with </think>
            start = len(ctx) + len(think) + len(self.closing) - 1
            for p in range(start, len(seq) - 1):
                tgt[p] = seq[p + 1]
            aux = [-100] * len(seq)
            for p in range(len(ctx) - 2):
                aux[p] = seq[p + 1]
            out.append((seq, tgt, aux))
            if "call" in step:
                history = history + self.past_step(call_text(step["call"]), step["observation"])
        return out


def build_hf_tokenizer(corpus: list[str], vocab_size: int, max_len: int):
    from train_tiny_reasoner import build_tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(corpus, vocab_size),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[THINK_OPEN, THINK_CLOSE],
        model_max_length=max_len,
    )
    tok.chat_template = CHAT_TEMPLATE.replace("opens_think", "false")
    assert len(SPECIAL_TOKENS) == 5
    return tok


def corpus_texts(trajs: list[dict], system: str) -> list[str]:
    texts = []
    for t in trajs:
        parts = [first_turn(system, t["question"])]
        for s in t["steps"]:
            parts.append(f"{THINK_OPEN}\n{s['thinking']}{CLOSING}")
            if "call" in s:
                parts.append(f"{CALL_OPEN}\n{call_text(s['call'])}" + response_turn(s["observation"]))
            else:
                parts.append(f"{ANSWER_OPEN}{s['answer']}{ANSWER_CLOSE}")
        texts.append("".join(parts))
    return texts


def check_grammar_bytes(log=print) -> str:
    """Check that xgrammar's grammar for the call schema with any_whitespace=False (what the server
    compiles under --constrained-json-disable-any-whitespace) separates with ", " and ": ", as
    `json.dumps` does."""
    try:
        import xgrammar as xgr
    except ImportError:
        return "xgrammar not installed: not checked"
    tools = Toolset([SearchTool(LocalCorpus(syn.CORPUS), top_k=TOP_K)])
    text = str(xgr.Grammar.from_json_schema(json.dumps(tools.call_schema()), any_whitespace=False))
    assert '"\\"name\\"" ": "' in text and '(", " "\\"arguments\\""' in text, text
    result = f"xgrammar (any_whitespace=False) forces the separators ', ' and ': ': {call_text(search_call('Ragul', 'founder'))}"
    log(result)
    return result


# --- model ----------------------------------------------------------------------------------------


def build_model(tok, args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * args.ffn_mult,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions, rope_theta=10000.0, rms_norm_eps=1e-6,
        initializer_range=0.02, tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, torch_dtype="float32")
    torch.manual_seed(args.seed)
    return Qwen2ForCausalLM(config)


def batch_tensors(examples, pad_id):
    width = max(len(e[0]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    tgt = torch.full((len(examples), width), -100, dtype=torch.long)
    aux = torch.full((len(examples), width), -100, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (s, t, a) in enumerate(examples):
        ids[i, : len(s)] = torch.tensor(s)
        tgt[i, : len(t)] = torch.tensor(t)
        aux[i, : len(a)] = torch.tensor(a)
        attn[i, : len(s)] = 1
    return ids, attn, tgt, aux


# --- the check: the agent's loop in transformers --------------------------------------------------


class LocalAgent:
    """The agent's loop (shared history) on a transformers model, K = 1 or K merged branches."""

    def __init__(self, model, tok, tools: Toolset, system: str, think_tokens=24, call_tokens=40,
                 answer_tokens=16, max_steps=5):
        self.model, self.enc, self.tools = model, Encoder(tok, system), tools
        self.pad = tok.pad_token_id
        self.tok = tok
        self.think_tokens, self.call_tokens, self.answer_tokens = think_tokens, call_tokens, answer_tokens
        self.max_steps = max_steps
        self.call_open = self.enc.ids(f"{CALL_OPEN}\n")
        self.answer_open = self.enc.ids(ANSWER_OPEN)

    @torch.no_grad()
    def _gen(self, contexts, n, temperature, stop=None, merge=False, gen=None):
        """Decode up to `n` tokens for each context (left-padded batch, KV cache); with `merge` one
        token for all, from the rows' averaged log-probabilities. Stops a row at a token in `stop`."""
        width = max(map(len, contexts))
        ids = torch.tensor([[self.pad] * (width - len(c)) + c for c in contexts])
        attn = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts])
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        outs = [[] for _ in contexts]
        done = [False] * len(contexts)
        last = pos[:, -1]
        for _ in range(n):
            logp = torch.log_softmax(out.logits[:, -1].float(), -1)
            if merge:
                logp = logp.mean(0, keepdim=True).expand_as(logp)
            if temperature <= 0:
                nxt = logp.argmax(-1)
            else:
                probs = torch.softmax(logp / temperature, -1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
                if merge:
                    nxt = nxt[:1].expand_as(nxt)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    outs[i].append(t)
                    done[i] = stop is not None and t in stop
            if all(done):
                break
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], -1)
            last = last + 1
            out = self.model(input_ids=nxt.unsqueeze(-1), attention_mask=attn, position_ids=last.unsqueeze(-1),
                             past_key_values=out.past_key_values, use_cache=True)
        return outs

    def _decide(self, contexts, temperature, merge, gen):
        """The decision after thinking: <tool_call> or <answer> (first token restricted to the two,
        as the agent's regex), then the call's JSON or the answer."""
        logits = []
        with torch.no_grad():
            for c in contexts:
                logits.append(torch.log_softmax(self.model(input_ids=torch.tensor([c])).logits[0, -1], -1))
        logp = torch.stack(logits)
        pick = torch.stack([logp[:, self.call_open[0]], logp[:, self.answer_open[0]]], -1)
        if merge:
            pick = pick.mean(0, keepdim=True)
        if temperature <= 0:
            kinds = pick.argmax(-1).tolist()
        else:
            kinds = torch.multinomial(torch.softmax(pick / temperature, -1), 1, generator=gen).squeeze(-1).tolist()
        kinds = kinds * len(contexts) if merge else kinds
        out = []
        for kind in sorted(set(kinds)):
            rows = [i for i, k in enumerate(kinds) if k == kind]
            opening = self.call_open if kind == 0 else self.answer_open
            ctxs = [contexts[i] + opening for i in rows]
            n = self.call_tokens if kind == 0 else self.answer_tokens
            gens = self._gen(ctxs, n, temperature, merge=merge, gen=gen)
            for i, g in zip(rows, gens):
                out.append((i, kind, self.tok.decode(g, skip_special_tokens=False)))
        return [x[1:] for x in sorted(out)]

    def run(self, questions: list[str], k: int = 1, temperature: float = 0.0, merge: bool = False, seed: int = 0):
        """Answers of one trajectory per question (merged over k branches with `merge`)."""
        gen = torch.Generator().manual_seed(seed)
        rows = len(questions)
        histories = [self.enc.prefix(q) for q in questions]
        answers: list[str | None] = [None] * rows
        calls = [0] * rows
        live = list(range(rows))
        for number in range(1, self.max_steps + 1):
            if not live:
                break
            if merge:
                results = {}
                for r in live:
                    prompts = [histories[r] + self.enc.think_open] * k
                    thoughts = self._gen(prompts, self.think_tokens, temperature, stop={self.enc.close_id}, gen=gen)
                    ctxs = [p + [t for t in th if t != self.enc.close_id] + self.enc.closing
                            for p, th in zip(prompts, thoughts)]
                    results[r] = self._decide(ctxs, temperature, True, gen)[0]
            else:
                prompts = [histories[r] + self.enc.think_open for r in live]
                thoughts = self._gen(prompts, self.think_tokens, temperature, stop={self.enc.close_id}, gen=gen)
                ctxs = [p + [t for t in th if t != self.enc.close_id] + self.enc.closing
                        for p, th in zip(prompts, thoughts)]
                results = dict(zip(live, self._decide(ctxs, temperature, False, gen)))
            still = []
            for r in live:
                kind, text = results[r]
                if kind == 1 or number == self.max_steps:
                    answers[r] = text.split(ANSWER_CLOSE)[0].strip() if kind == 1 else ""
                    continue
                raw = text.split("}}")[0] + "}}"
                try:
                    call = json.loads(raw)
                    obs = self.tools.call(call["name"], call["arguments"]).text
                except (ValueError, KeyError, TypeError):
                    obs = 'That was not a tool call: give {"name": ..., "arguments": {...}}.'
                calls[r] += 1
                histories[r] = histories[r] + self.enc.past_step(raw, obs)
                still.append(r)
            live = still
        return answers, calls


def check(model_dir: Path, n: int, samples: int, temperature: float, log=print, seed: int = 0) -> dict:
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    system_template = (model_dir / SYSTEM_PROMPT_FILE).read_text()
    tools = Toolset([SearchTool(LocalCorpus(syn.CORPUS), top_k=TOP_K)])
    system = render_system(system_template, tools)
    problems = syn.load_questions()[:n]
    questions = [p["question"] for p in problems]
    agent = LocalAgent(model, tok, tools, system)
    t0 = time.time()

    def acc(answers):
        return sum(syn.is_correct(a or "", p) for a, p in zip(answers, problems)) / len(problems)

    greedy, calls = agent.run(questions, temperature=0.0)
    res = {"questions": n, "temperature": temperature, "top_k": TOP_K, "greedy_acc": acc(greedy),
           "greedy_mean_calls": sum(calls) / n}
    log(f"greedy {res['greedy_acc']:.3f}", flush=True)
    sampled = [agent.run(questions, temperature=temperature, seed=seed + s)[0] for s in range(samples)]
    res["single_sampled_acc"] = sum(acc(a) for a in sampled) / samples
    vote = 0
    for i, p in enumerate(problems):
        answers = [syn.normalize_answer(a[i] or "") for a in sampled]
        counts = collections.Counter(a for a in answers if a)
        if counts:
            best = max(counts.values())
            top = next(a for a in answers if a and counts[a] == best)
            vote += syn.is_correct(top, p)
    res[f"vote@{samples}_acc"] = vote / n
    log(f"single sampled {res['single_sampled_acc']:.3f}  vote@{samples} {res[f'vote@{samples}_acc']:.3f}", flush=True)
    merged, _ = agent.run(questions, k=samples, temperature=temperature, merge=True, seed=seed)
    res[f"merge@{samples}_acc"] = acc(merged)
    res["samples"] = samples
    res["seconds"] = round(time.time() - t0, 1)
    log(json.dumps(res), flush=True)
    return res


# --- saving ---------------------------------------------------------------------------------------


def save(model, tok, out: Path, meta: dict) -> None:
    from train_tiny_reasoner import finish_tokenizer_files

    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file():
            f.unlink()
    model.config.use_cache = True
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_p = True, 0.7, 1.0
    gc.eos_token_id, gc.pad_token_id = tok.eos_token_id, tok.pad_token_id
    gc.bos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    finish_tokenizer_files(out, tok)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["torch_dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / SYSTEM_PROMPT_FILE).write_text(SYSTEM_PROMPT)
    (out / RECORD).write_text(json.dumps(meta, indent=2) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=MODEL_DIR)
    ap.add_argument("--world-seeds", type=int, nargs="+", default=list(range(1, 11)),
                    help="worlds the training questions are drawn from (not the shipped world)")
    ap.add_argument("--questions", type=int, default=600, help="training questions per world")
    ap.add_argument("--slip", type=float, default=0.3, help="share of thinkings that name the twin")
    ap.add_argument("--history-weight", type=float, default=0.5,
                    help="weight of the auxiliary next-token loss on the history (question, calls, observations)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="continue from this saved model (a further stage; the record keeps the earlier ones)")
    add_run_args(ap, steps=1700, minutes=23.5, lr=3e-3, warmup=60, log_every=25)
    ap.add_argument("--batch-size", type=int, default=32)
    add_shape_args(ap, vocab_size=512)
    ap.add_argument("--max-positions", type=int, default=1024)
    ap.add_argument("--check-questions", type=int, default=50)
    ap.add_argument("--check-samples", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--no-check", action="store_true")
    args = parse_args(ap, argv)

    if args.eval_only:
        res = check(args.out, args.check_questions, args.check_samples, args.temperature, seed=args.seed)
        path = args.out / RECORD
        meta = json.loads(path.read_text())
        meta["check"] = res
        path.write_text(json.dumps(meta, indent=2) + "\n")
        return 0

    random.seed(args.seed)
    grammar = check_grammar_bytes()
    trajs = training_worlds(args.world_seeds, args.questions, args.seed, args.slip)
    heldout = {p["question"] for p in syn.load_questions()}
    assert not heldout & {t["question"] for t in trajs}
    from transformers import AutoTokenizer, Qwen2ForCausalLM
    if args.init_from is not None:  # a further stage from a saved model (its tokenizer and weights)
        tok = AutoTokenizer.from_pretrained(args.init_from)
        model = Qwen2ForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        torch.manual_seed(args.seed)
    else:
        tok = build_hf_tokenizer(corpus_texts(trajs[:3000], SYSTEM_PROMPT), args.vocab_size, args.max_positions)
        model = build_model(tok, args)
        args.out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(args.out)
        loaded = AutoTokenizer.from_pretrained(args.out)
        probe = corpus_texts(trajs[:20], SYSTEM_PROMPT)
        for text in probe:
            assert tok(text, add_special_tokens=False)["input_ids"] == loaded(text, add_special_tokens=False)["input_ids"]
        tok = loaded
    enc = Encoder(tok, SYSTEM_PROMPT)
    examples = [ex for t in trajs for ex in enc.examples(t)]
    lengths = [len(e[0]) for e in examples]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tok)}  params {n_params / 1e6:.3f}M  {len(trajs)} trajectories, {len(examples)} step "
          f"examples, tokens mean {sum(lengths) / len(lengths):.0f} max {max(lengths)}", flush=True)
    print("example:", repr(tok.decode(examples[3][0])), flush=True)
    assert max(lengths) <= args.max_positions

    rng = random.Random(args.seed)
    # Batches of examples of similar length (little padding), in a fresh random order each epoch.
    order = sorted(range(len(examples)), key=lambda i: (lengths[i], i))
    buckets = [order[i: i + args.batch_size] for i in range(0, len(order) - args.batch_size + 1, args.batch_size)]
    queue: list[list[int]] = []

    def losses(step):
        nonlocal queue
        if not queue:
            queue = buckets[:]
            rng.shuffle(queue)
        ids, attn, tgt, aux = batch_tensors([examples[i] for i in queue.pop()], tok.pad_token_id)
        logits = model(input_ids=ids, attention_mask=attn).logits.reshape(-1, len(tok))
        main_loss = torch.nn.functional.cross_entropy(logits, tgt.reshape(-1), ignore_index=-100)
        aux_loss = torch.nn.functional.cross_entropy(logits, aux.reshape(-1), ignore_index=-100)
        return main_loss + args.history_weight * aux_loss, {"loss": main_loss, "history loss": aux_loss}

    steps, minutes, running = train(model, args, losses)
    meta = {"seed": args.seed, "steps": steps, "batch_size": args.batch_size, "lr": args.lr,
            "slip": args.slip, "world_seeds": args.world_seeds, "questions_per_world": args.questions,
            "trajectories": len(trajs), "step_examples": len(examples),
            "max_example_tokens": max(lengths), "train_minutes": round(minutes, 1),
            "final_loss": round(running["loss"], 4), "final_history_loss": round(running["history loss"], 4),
            "history_weight": args.history_weight, "params": n_params, "top_k": TOP_K,
            "system_prompt": SYSTEM_PROMPT, "grammar": grammar,
            "thinking": {"search": thinking_search("RELATION", "NAME"), "answer": thinking_answer("NAME")},
            "task": "sgl_merge.research.synthetic", "threads": args.threads}
    if args.init_from is not None:
        earlier = json.loads((args.init_from / RECORD).read_text())
        meta["init_from"] = str(args.init_from)
        meta["earlier_stages"] = earlier.pop("earlier_stages", []) + [earlier]
        meta["total_train_minutes"] = round(minutes + sum(e["train_minutes"] for e in meta["earlier_stages"]), 1)
        meta["total_steps"] = steps + sum(e["steps"] for e in meta["earlier_stages"])
    save(model, tok, args.out, meta)
    print(f"wrote {args.out}", flush=True)
    if not args.no_check:
        meta["check"] = check(args.out, args.check_questions, args.check_samples, args.temperature, seed=args.seed)
        (args.out / RECORD).write_text(json.dumps(meta, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
