"""The request contract's parsing, and group routing for data parallelism (unit level)."""

import pytest

from sgl_merge.runtime.hooks import dp_rank_for_group
from sgl_merge.runtime.spec import MemberSpec, MergeSpecError, parse_member_spec


def test_plain_requests_have_no_spec():
    assert parse_member_spec(None) is None
    assert parse_member_spec({"other": 1}) is None


def test_defaults_and_explicit_fields():
    assert parse_member_spec({"sgl_merge": {"group": "g", "size": 3}}) == MemberSpec("g", 3, "logits", 1.0)
    assert parse_member_spec({"sgl_merge": {"group": "g", "size": 2, "mode": "probs", "weight": 2}}) == \
        MemberSpec("g", 2, "probs", 2.0)


@pytest.mark.parametrize("entry", [{"group": "g", "size": True}, {"group": "g", "size": 1.5},
                                   {"group": "", "size": 2}, {"group": 7, "size": 2},
                                   {"group": "g", "size": 2, "weight": float("nan")}])
def test_malformed_values_are_refused(entry):
    with pytest.raises(MergeSpecError, match="sampling_params.custom_params.sgl_merge"):
        parse_member_spec({"sgl_merge": entry})


def test_all_members_of_a_group_route_to_one_dp_rank():
    ranks = {dp_rank_for_group("group-42", 4) for _ in range(5)}
    assert len(ranks) == 1 and ranks.pop() in range(4)
    assert len({dp_rank_for_group(f"g{i}", 4) for i in range(64)}) == 4  # groups spread over ranks
