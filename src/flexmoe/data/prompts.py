"""Prompt templates: Alpaca-style by default, or the tokenizer's own chat template."""

from __future__ import annotations

from flexmoe.data.example import Example
from flexmoe.errors import FlexmoeError

TEMPLATES = ("alpaca", "chat")

# The Stanford Alpaca prompts, verbatim.
ALPACA_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
ALPACA_WITHOUT_CONTEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(example: Example, template: str = "alpaca", tokenizer=None) -> str:
    """The prompt text for `example` (no response): the model continues it with the response."""
    if template == "alpaca":
        form = ALPACA_WITH_CONTEXT if example.context.strip() else ALPACA_WITHOUT_CONTEXT
        return form.format(instruction=example.instruction, context=example.context)
    if template == "chat":
        return _chat_prompt(example, tokenizer)
    raise FlexmoeError(f"unknown prompt template {template!r}; valid: {', '.join(TEMPLATES)}")


def _chat_prompt(example: Example, tokenizer) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise FlexmoeError("prompt template 'chat' needs a tokenizer that has a chat template")
    content = example.instruction
    if example.context.strip():
        content += "\n\n" + example.context
    return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                         tokenize=False, add_generation_prompt=True)
