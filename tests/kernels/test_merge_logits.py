"""The merge of each merge group's logits rows: the torch reference on hand-checkable cases, then
the vectorised torch path and the Triton kernels against that reference on random layouts.

The Triton kernels run on this CPU machine only under the Triton interpreter, which must be chosen
(TRITON_INTERPRET=1) before triton is imported, and other test modules import triton first (sglang
does). So the interpreter checks run in one child process: this file, run as a script, compares
every case and prints the outcomes as JSON; the parent asserts on them. On a CUDA machine the same
comparison also runs natively in-process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgl_merge.kernels.merge_logits import (
    MODES,
    gather_plan,
    merge_logits_,
    merge_logits_reference,
    merge_logits_torch,
    merge_logits_triton,
    pack_groups,
)

INF = math.inf
REPO_ROOT = Path(__file__).resolve().parents[2]

# fp32: the paths differ only in summation order and exp/log rounding. bf16: one bf16 ulp (at most
# 2^-7 relative), because the fp32 results may land on either side of a rounding boundary, and the
# Triton interpreter truncates fp32 -> bf16 where torch and the GPU round to nearest even.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
# Mode 3 in fp32: its weights come from entropies summed over the whole vocabulary, whose rounding
# (about 1e-6 relative at V = 151936) moves every merged value of a row a little, so a value that
# nearly cancels to 0 sees an absolute error of a few 1e-5 (measured 2.5e-5 on logits ~ 3 * randn).
ENTROPY_FP32 = dict(rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Random layouts shared by the torch-path, interpreter and GPU comparisons.


def random_case(seed: int, sizes: list[int], n_ungrouped: int, vocab: int, dtype: torch.dtype):
    """Logits with masked tokens, and groups of the given sizes over shuffled rows (so members are
    unsorted and non-contiguous), with random weights and all three modes mixed in one call.
    Returns (logits, tables, ungrouped_rows)."""
    gen = torch.Generator().manual_seed(seed)
    n_rows = sum(sizes) + n_ungrouped
    logits = 3 * torch.randn(n_rows, vocab, generator=gen)
    logits[torch.rand(n_rows, vocab, generator=gen) < 0.05] = -INF  # masked in some members
    logits[:, torch.randperm(vocab, generator=gen)[: vocab // 50]] = -INF  # masked in every row
    order = torch.randperm(n_rows, generator=gen).tolist()
    groups, start = [], 0
    for g, size in enumerate(sizes):
        weights = (0.1 + 2 * torch.rand(size, generator=gen)).tolist()
        tau = float(0.05 + 3 * torch.rand(1, generator=gen))  # read by mode 3 groups only
        groups.append((order[start : start + size], weights, (g + seed) % len(MODES), tau))
        start += size
    return logits.to(dtype), pack_groups(groups), order[start:]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that equality is exact (nan, -0.0 included)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def mismatch(merge, case, device: str) -> str | None:
    """Run `merge` on a copy of the case's logits; None if it matches the reference within
    tolerance and left every ungrouped row bit-identical, else what went wrong."""
    logits, tables, ungrouped = case
    logits = logits.to(device)
    tables = [t.to(device) for t in tables]
    expected = logits.clone()
    merge_logits_reference(expected, *tables)
    got = logits.clone()
    merge(got, *tables)
    if not torch.equal(bits(got[ungrouped]), bits(logits[ungrouped])):
        return "an ungrouped row changed"
    rows, _, modes, _ = (t.cpu() for t in tables)
    entropy_rows = rows[modes == MODES["entropy"]].flatten()
    entropy_rows = entropy_rows[entropy_rows >= 0].tolist()
    other_rows = [r for r in range(len(logits)) if r not in set(entropy_rows)]
    loose = ENTROPY_FP32 if logits.dtype == torch.float32 else TOLERANCES[logits.dtype]
    try:
        torch.testing.assert_close(got[other_rows], expected[other_rows], **TOLERANCES[logits.dtype])
        torch.testing.assert_close(got[entropy_rows], expected[entropy_rows], **loose)
    except AssertionError as e:
        return str(e)
    return None


# Triton cases: every group size 1..16, unsorted members, mixed modes, ungrouped rows, V not a
# multiple of the tile, and one real vocabulary. Modest shapes: the interpreter is slow.
TRITON_CASES = {
    f"{name}-{str(dtype).removeprefix('torch.')}": (seed, sizes, n_ungrouped, vocab, dtype)
    for name, seed, sizes, n_ungrouped, vocab in [
        ("sizes1-8-V3000", 1, [3, 1, 8, 5, 2, 7, 4, 6], 4, 3000),
        ("sizes9-12-V387", 2, [9, 12, 10, 11], 3, 387),
        ("sizes13-16-V387", 3, [16, 13, 15, 14], 2, 387),
        ("V151936", 4, [2, 1, 3, 2], 2, 151936),  # all four modes
    ]
    for dtype in (torch.float32, torch.bfloat16)
}


def triton_mismatches(device: str) -> dict[str, str | None]:
    return {name: mismatch(merge_logits_triton, random_case(*spec), device) for name, spec in TRITON_CASES.items()}


# ---------------------------------------------------------------------------------------------
# The reference, and the torch path, on hand-checkable cases.

MERGES = [pytest.param(merge_logits_reference, id="reference"), pytest.param(merge_logits_torch, id="torch")]


def merged(merge, rows: list[list[float]], groups) -> torch.Tensor:
    logits = torch.tensor(rows, dtype=torch.float32)
    merge(logits, *pack_groups(groups))
    return logits


@pytest.mark.parametrize("merge", MERGES)
def test_logits_mode_is_the_weighted_mean(merge):
    out = merged(merge, [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], [([0, 1], [1.0, 3.0], "logits")])
    torch.testing.assert_close(out, torch.tensor([[2.5, 2.0, 1.5]] * 2))


@pytest.mark.parametrize("merge", MERGES)
def test_logprobs_mode_is_the_geometric_mixture(merge):
    # softmax rows: [1/2, 1/2] and [3/4, 1/4]; equal weights.
    out = merged(merge, [[0.0, 0.0], [math.log(3), 0.0]], [([1, 0], [1.0, 1.0], "logprobs")])
    expected = [0.5 * (math.log(1 / 2) + math.log(3 / 4)), 0.5 * (math.log(1 / 2) + math.log(1 / 4))]
    torch.testing.assert_close(out, torch.tensor([expected] * 2))


@pytest.mark.parametrize("merge", MERGES)
def test_probs_mode_is_the_arithmetic_mixture(merge):
    # Weights 1:3 of [1/2, 1/2] and [3/4, 1/4] give [11/16, 5/16].
    out = merged(merge, [[0.0, 0.0], [math.log(3), 0.0]], [([0, 1], [1.0, 3.0], "probs")])
    torch.testing.assert_close(out, torch.tensor([[math.log(11 / 16), math.log(5 / 16)]] * 2))


@pytest.mark.parametrize("merge", MERGES)
def test_groups_of_one(merge):
    rows = [[0.5, -1.25, 7.0, -INF], [0.0, math.log(3), -INF, 0.0]]
    out = merged(merge, rows, [([0], [5.0], "logits"), ([1], [1.0], "logprobs")])
    assert torch.equal(out[0], torch.tensor(rows[0]))
    torch.testing.assert_close(out[1], torch.tensor([math.log(1 / 5), math.log(3 / 5), -INF, math.log(1 / 5)]))


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("mode", list(MODES))
def test_masked_tokens(merge, mode):
    # Token 0 is masked in one member, token 1 in both, token 2 in neither.
    out = merged(merge, [[-INF, -INF, 0.0], [0.0, -INF, 0.0]], [([0, 1], [1.0, 1.0], mode)])
    assert out[0, 1] == -INF and math.isfinite(out[0, 2])
    assert (out[0, 0] == -INF) == (mode != "probs")
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("merge", MERGES)
def test_mixed_modes_in_one_call_and_untouched_rows(merge):
    before = torch.tensor(
        [[1.0, 2.0], [-0.0, INF], [3.0, 0.0], [math.nan, -INF], [0.0, 1.0], [5.0, 5.0], [1.0, 1.0]]
    )
    after = before.clone()
    merge(after, *pack_groups([([4, 0], [1.0, 1.0], "logits"), ([6, 2, 5], [1.0, 1.0, 2.0], "probs")]))
    assert torch.equal(bits(after[[1, 3]]), bits(before[[1, 3]]))
    torch.testing.assert_close(after[[0, 4]], torch.tensor([[0.5, 1.5]] * 2))
    probs = 0.25 * before[6].softmax(-1) + 0.25 * before[2].softmax(-1) + 0.5 * before[5].softmax(-1)
    torch.testing.assert_close(after[[2, 5, 6]], probs.log().expand(3, 2))


def test_pack_groups_normalises_weights_and_pads():
    rows, weights, modes, taus = pack_groups([([4, 1], [2.0, 6.0], "probs"), ([0], [3.0], 1, 0.5)], k_max=4)
    assert rows.tolist() == [[4, 1, -1, -1], [0, -1, -1, -1]]
    assert weights.tolist() == [[0.25, 0.75, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    assert modes.tolist() == [MODES["probs"], MODES["logprobs"]]
    assert taus.tolist() == [1.0, 0.5]
    assert (rows.dtype, weights.dtype, modes.dtype, taus.dtype) == (torch.int32, torch.float32, torch.int32,
                                                                   torch.float32)


@pytest.mark.parametrize("merge", MERGES)
def test_entropy_mode_weights_each_member_by_its_own_certainty(merge):
    # Member 0 is uniform over 2 tokens (H = log 2), member 1 certain-ish: p = [3/4, 1/4].
    rows = [[0.0, 0.0], [math.log(3), 0.0]]
    h = [math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    for tau in (0.5, 2.0):
        out = merged(merge, rows, [([0, 1], [1.0, 3.0], "entropy", tau)])
        v = torch.tensor([1.0 * math.exp(-h[0] / tau), 3.0 * math.exp(-h[1] / tau)])
        v /= v.sum()
        expected = v[0] * torch.tensor(rows[0]) + v[1] * torch.tensor(rows[1])
        torch.testing.assert_close(out, expected.expand(2, 2))
    # A huge tau is the plain weighted mean (mode 0).
    torch.testing.assert_close(merged(merge, rows, [([0, 1], [1.0, 3.0], "entropy", 1e9)]),
                               merged(merge, rows, [([0, 1], [1.0, 3.0], "logits")]))


@pytest.mark.parametrize("merge", MERGES)
def test_entropy_mode_with_an_underflowed_weight_masks_nothing(merge):
    # Member 0 is nearly certain, member 1 uniform over 3 of 4 tokens: with tau tiny, member 1's
    # weight is exp(-log(3) / 1e-3) = 0, and its -inf token must not make the merged row nan.
    rows = [[30.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -INF]]
    out = merged(merge, rows, [([0, 1], [1.0, 1.0], "entropy", 1e-3)])
    torch.testing.assert_close(out, torch.tensor([rows[0]] * 2))


@pytest.mark.parametrize(
    "groups",
    [
        [([0, 1], [1.0, 0.0], "logits")],  # non-positive weight
        [([0, 1], [1.0, 1.0], "logits"), ([1], [1.0], "probs")],  # row in two groups
        [([], [], "logits")],  # empty group
        [([0], [1.0], "median")],  # unknown mode
        [([0], [1.0], "entropy", 0.0)],  # non-positive tau
    ],
)
def test_pack_groups_refuses_bad_groups(groups):
    with pytest.raises((ValueError, KeyError)):
        pack_groups(groups)


def test_no_groups_is_a_no_op():
    logits = torch.randn(3, 5)
    before = logits.clone()
    merge_logits_(logits, *pack_groups([]))
    assert torch.equal(logits, before)


# ---------------------------------------------------------------------------------------------
# The vectorised torch path against the reference on random layouts.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(6))
def test_torch_path_matches_reference(seed, dtype):
    gen = torch.Generator().manual_seed(100 + seed)
    sizes = torch.randint(1, 17, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen).tolist()
    vocab = int(torch.randint(2, 5000, (1,), generator=gen))
    assert mismatch(merge_logits_torch, random_case(seed, sizes, 3, vocab, dtype), "cpu") is None


def test_torch_path_covers_every_group_size():
    sizes = list(range(1, 17))
    for dtype in (torch.float32, torch.bfloat16):
        assert mismatch(merge_logits_torch, random_case(7, sizes, 5, 1031, dtype), "cpu") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path_merges_a_block_of_consecutive_rows_in_place(dtype):
    """Groups that fill consecutive rows (the usual batch of merge groups) are merged in place, with
    no gather: bit-identical to the gathered merge, also on logits whose rows are a slice of wider
    ones (a padded vocabulary), with rows outside the block left alone."""
    gen = torch.Generator().manual_seed(5)
    wide = 3 * torch.randn(11, 520, generator=gen)
    wide[torch.rand(11, 520, generator=gen) < 0.05] = -INF
    wide = wide.to(dtype)
    groups = [(list(range(2 + 4 * g, 6 + 4 * g)), (0.5 + torch.rand(4, generator=gen)).tolist(), "logits")
              for g in range(2)]
    tables = pack_groups(groups)
    plan = gather_plan(tables[0], tables[1])
    assert plan.dense and plan.span == (2, 10)
    in_place, gathered = wide[:, :500].clone(), wide.clone()[:, :500]
    assert in_place.stride(0) == 500 and gathered.stride(0) == 520
    merge_logits_torch(in_place, *tables, modes=frozenset({MODES["logits"]}), plan=plan)
    merge_logits_torch(gathered, *tables, modes=frozenset({MODES["logits"]}),
                       plan=dataclasses.replace(plan, span=None))
    assert torch.equal(bits(in_place), bits(gathered))
    assert torch.equal(bits(in_place[[0, 1, 10]]), bits(wide[[0, 1, 10], :500]))
    assert mismatch(merge_logits_torch, (wide[:, :500], tables, [0, 1, 10]), "cpu") is None


def test_gather_plan_of_padded_or_scattered_groups_gathers():
    padded = pack_groups([([0, 1, 2], [1, 1, 1], "logits"), ([3, 4], [1, 1], "logits")], k_max=4)
    scattered = pack_groups([([1, 0], [1, 1], "logits")])
    assert (gather_plan(*padded[:2]).dense, gather_plan(*padded[:2]).span) == (False, None)
    assert gather_plan(*scattered[:2]).dense and gather_plan(*scattered[:2]).span is None


def test_dispatch_uses_the_torch_path_on_cpu():
    case = random_case(8, [3, 2, 1], 2, 777, torch.float32)
    assert mismatch(merge_logits_, case, "cpu") is None


# ---------------------------------------------------------------------------------------------
# The Triton kernels against the reference: interpreted on CPU, natively on CUDA.


@pytest.fixture(scope="module")
def interpreted_outcomes() -> dict[str, str | None]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    child = subprocess.run(
        [sys.executable, __file__, "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, f"interpreter run failed:\n{child.stdout}\n{child.stderr}"
    return json.loads(child.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_kernel_interpreted_matches_reference(interpreted_outcomes, case):
    assert interpreted_outcomes[case] is None, interpreted_outcomes[case]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernel_on_gpu_matches_reference_without_host_sync():
    assert triton_mismatches("cuda") == dict.fromkeys(TRITON_CASES)
    logits, tables, _ = random_case(9, [4, 2, 1], 1, 151936, torch.bfloat16)
    logits, tables = logits.cuda(), [t.cuda() for t in tables]
    for merge in (merge_logits_triton, merge_logits_torch):
        merge(logits, *tables)  # compile / warm up outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            merge(logits, *tables)
        finally:
            torch.cuda.set_sync_debug_mode("default")


if __name__ == "__main__":
    # The child process of `interpreted_outcomes` (or a manual check on a GPU: --device cuda).
    parser = argparse.ArgumentParser(description="Compare the Triton merge with the reference; print JSON.")
    parser.add_argument("--device", default="cpu")
    device = parser.parse_args().device
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 to run the Triton kernels on CPU")
    print(json.dumps(triton_mismatches(device)))
