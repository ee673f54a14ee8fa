"""The request contract's parsing, and group routing for data parallelism (unit level)."""

import pytest

from sgl_merge.runtime.hooks import dp_rank_for_group
from sgl_merge.contract import (ContractError, MemberSpec, MergeSpecError, ParaThinkConfig, ThinkMergeConfig,
                                ThinkMergeError, parse_join, parse_keep, parse_member_spec, parse_parathink,
                                parse_think_merge)


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


@pytest.mark.parametrize("parse, value, field", [
    (parse_member_spec, {"sgl_merge": {"group": "g", "size": 0}}, "sampling_params.custom_params.sgl_merge.size"),
    (parse_member_spec, {"sgl_merge": {"group": "g", "size": 2, "colour": 1}},
     "sampling_params.custom_params.sgl_merge.colour"),
    (parse_keep, {"sgl_merge_keep": {"ttl_s": -1}}, "sampling_params.custom_params.sgl_merge_keep.ttl_s"),
    (parse_join, {"sgl_merge_join": {"sources": ["a"], "owner": ["x", "y"]}},
     "sampling_params.custom_params.sgl_merge_join.owner"),
    (parse_join, {"sgl_merge_join": {"sources": ["a"], "positions": "last"}},
     "sampling_params.custom_params.sgl_merge_join.positions"),
    (lambda entry: parse_think_merge(entry, None), {"k": 2, "mode": "vote"}, "think_merge.mode"),
    (lambda entry: parse_think_merge(entry, 4), {"k": 8}, "think_merge.k"),
    (lambda entry: parse_parathink(entry, None), {"paths": 2, "layout": "numbered"}, "parathink.layout"),
])
def test_every_contract_error_names_its_field(parse, value, field):
    with pytest.raises(ContractError) as info:
        parse(value)
    entry, _, name = field.rpartition(".")
    assert info.value.field == field and entry in str(info.value) and name in str(info.value)
    assert isinstance(info.value, ValueError)  # SGLang answers a ValueError from verify with a 400


def test_the_think_fields_parse_to_their_configs():
    assert parse_think_merge({"k": 3, "first": None, "tau": 2, "mode": "entropy"}, 8) == \
        ThinkMergeConfig(k=3, mode="entropy", tau=2.0)
    assert parse_parathink({"paths": 2, "first": 1}, None) == ParaThinkConfig(k=2, first=1)
    with pytest.raises(ThinkMergeError) as info:
        parse_think_merge({"k": 2, "thinking_temperature": True}, None)
    assert info.value.param == info.value.field == "think_merge.thinking_temperature"
