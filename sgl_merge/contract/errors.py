"""The one error type of the request contract."""

from __future__ import annotations


class ContractError(ValueError):
    """A request field is malformed: a 400 whose message names the field, `field` its dotted path
    (`sampling_params.custom_params.sgl_merge.size`, `think_merge.k`, ...)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
