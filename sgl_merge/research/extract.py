"""Tongyi DeepResearch's goal-directed `visit`: the page is read for the goal by the same model that
researches, and only what it extracts reaches the agent's history (a page of thousands of tokens
becomes a paragraph).

`GoalExtractor(server)` is the `extract` callable of `VisitTool`: one greedy request with Tongyi's
extractor prompt (Alibaba-NLP/DeepResearch, inference/prompt.py) as a ChatML user turn, or through
the server's chat template (`chat=True`, for `--layout chat`). It is written once, not merged: the K
branches would read the same prompt, and K equal rows average to the same row.
"""

from __future__ import annotations

from sgl_merge.frontend.merge import ServerClient
from sgl_merge.research.tools import ToolFailure

EXTRACTOR_PROMPT = """Please process the following webpage content and user goal to extract relevant information:

## **Webpage Content** 
{webpage_content}

## **User Goal**
{goal}

## **Task Guidelines**
1. **Content Scanning for Rationale**: Locate the **specific sections/data** directly related to the user's goal within the webpage content
2. **Key Extraction for Evidence**: Identify and extract the **most relevant information** from the content, you never miss any important information, output the **full original context** of the content as far as possible, it can be more than three paragraphs.
3. **Summary Output for Summary**: Organize into a concise paragraph with logical flow, prioritizing clarity and judge the contribution of the information to the goal.

**Final Output Format using JSON format has "rational", "evidence", "summary" feilds**
"""


class GoalExtractor:
    """`(goal, page_text) -> extract`, written by the model on `server`."""

    def __init__(self, server: ServerClient, *, max_tokens: int = 1024, chat: bool = False):
        self.server, self.max_tokens, self.chat = server, max_tokens, chat

    def __call__(self, goal: str, text: str) -> str:
        prompt = EXTRACTOR_PROMPT.format(webpage_content=text, goal=goal)
        if self.chat:
            r = self.server.post("/v1/chat/completions", {
                "model": "default", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens, "temperature": 0.0}, timeout=None)
        else:
            r = self.server.post("/generate", {
                "text": f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
                "sampling_params": {"max_new_tokens": self.max_tokens, "temperature": 0.0}}, timeout=None)
        if r.status_code != 200:
            raise ToolFailure(f"the page was read, but its extract failed (HTTP {r.status_code}: {r.text[:200]})")
        out = r.json()
        extract = out["choices"][0]["message"]["content"] if self.chat else out["text"]
        return (extract or "").strip() or "The page holds nothing for this goal."
