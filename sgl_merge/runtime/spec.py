"""Moved: the `sgl_merge` member entry is `sgl_merge.contract.merge`, at the bottom of the package.
Its names stay importable from here for code written against the old place (import them from
`sgl_merge.contract`)."""

from __future__ import annotations

from sgl_merge.contract.merge import (KEY, MODES, SHARED_SAMPLING_FIELDS, MemberSpec, MergeSpecError,
                                      expand_shared_weights, first_mismatch, parse_member_spec, sampling_signature)

__all__ = ["KEY", "MODES", "SHARED_SAMPLING_FIELDS", "MemberSpec", "MergeSpecError", "expand_shared_weights",
           "first_mismatch", "parse_member_spec", "sampling_signature"]
