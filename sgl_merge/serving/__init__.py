"""ThinkMerge behind SGLang's HTTP API: the `think_merge` field of the OpenAI-compatible routes.

`think_merge` holds the field's contract and the in-server flow (k thinking traces, then one merge
group); `openai_api` hooks it into SGLang's own OpenAI serving classes, so everything else about a
request (chat template, sampling, tool-call parsing, usage, SSE framing) stays SGLang's.
"""
