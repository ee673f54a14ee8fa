"""The request contract, at the bottom of the package: the request fields sgl-merge reads, their
validation, and ParaThinker's layout. It imports neither torch nor SGLang; the runtime, serving,
frontend and evaluation import down into it (docs/request-contract.md, docs/architecture.md).

- `merge`: the `sgl_merge` member entry of `sampling_params.custom_params` (a merge group);
- `join`: the KV join's `sgl_merge_keep` and `sgl_merge_join` entries;
- `think`: the `think_merge` and `parathink` fields of the OpenAI routes;
- `parathink_layout`: ParaThinker's control tokens, how requests are laid out with them and how a
  tokenizer is recognised as having them;
- `errors`: `ContractError`, the one error type: a 400 whose message names the field, `field` its
  dotted path. `MergeSpecError` (the custom_params entries) and `ThinkMergeError` (the OpenAI
  fields) are its two kinds.
"""

from sgl_merge.contract.errors import ContractError
from sgl_merge.contract.join import JOIN_KEY, KEEP_KEY, POSITIONS, JoinSpec, KeepSpec, parse_join, parse_keep
from sgl_merge.contract.merge import KEY, MODES, MemberSpec, MergeSpecError, parse_member_spec
from sgl_merge.contract.think import ParaThinkConfig, ThinkMergeConfig, ThinkMergeError, parse_parathink, parse_think_merge

__all__ = ["ContractError", "JOIN_KEY", "JoinSpec", "KEEP_KEY", "KEY", "KeepSpec", "MODES", "MemberSpec",
           "MergeSpecError", "POSITIONS", "ParaThinkConfig", "ThinkMergeConfig", "ThinkMergeError", "parse_join",
           "parse_keep", "parse_member_spec", "parse_parathink", "parse_think_merge"]
