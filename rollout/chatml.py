"""ChatML: the special strings of the chat format, the tokenizer's chat template and the one-question prompt.

    <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n                 (chat_prompt)
    <|im_start|>assistant\\n<think>\\n...\\n</think>\\n\\n<tool_call>{json}</tool_call><|im_end|>\\n
    <|im_start|>tool\\n<tool_response>{result}</tool_response><|im_end|>\\n

The rendering of whole conversations with loss masks is `rl.train.chat`; tool-call parsing is
`rollout.agent.toolcall`; the tiny tokenizer (`rollout.tokenizer`) has each string here as one token.
"""

from __future__ import annotations

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
ASSISTANT_HEADER = f"{IM_START}assistant\n"   # what a generation prompt ends with

# Jinja chat template (transformers' `tokenizer.chat_template`): one block per message, no system default.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '" + IM_START + "' + message['role'] + '\n' + message['content'] + '" + IM_END + "' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT_HEADER + "' }}{% endif %}"
)


def chat_prompt(question: str) -> str:
    """The generation prompt of one user question (no system prompt: a tiny model's context is short)."""
    return f"{IM_START}user\n{question}{IM_END}\n{ASSISTANT_HEADER}"
