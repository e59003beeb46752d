"""Built-ins other than math: format, json, tool_call, overlong, length."""

import json

import pytest

from rewards import RewardSpecError, load_reward


def one(fn, completion, prompt="p", **fields):
    return fn([prompt], [completion], [fields])[0]


def test_format_full_and_partial_credit():
    f = load_reward("format")
    assert one(f, "<think>reason</think> The answer is 4.") == 1.0
    assert one(f, "  <think>\nreason\n</think>\n\\boxed{4}") == 1.0
    for bad in ["<think></think> 4", "<think>r</think>", "4", "<think>a<think>b</think> 4",
                "<think>r</think> 4 </think>", "</think> 4 <think>r"]:
        assert one(f, bad) == 0.0, bad
    p = load_reward("format", partial=True)
    assert one(p, "<think>reason</think> 4") == 1.0
    assert one(p, "<think>reason 4") == pytest.approx(1 / 3)                # opened only
    assert one(p, "<think>reason</think>") == pytest.approx(2 / 3)          # no answer after it
    assert one(p, "just 4") == 0.0
    a = load_reward("format", answer_tag="answer", partial=True, reward=2.0)
    assert one(a, "<think>r</think><answer>4</answer>") == 2.0
    assert one(a, "<think>r</think><answer>4</answer> trailing") == pytest.approx(1.5)
    assert one(a, "<think>r</think> 4") == pytest.approx(1.5)                # no answer block
    assert one(p, "<think></think> 4") == pytest.approx(2 / 3)               # empty reasoning
    t = load_reward("format", think_in_prompt=True)
    assert one(t, "reasoning</think> 4", prompt="... <think>") == 1.0
    assert one(t, "<think>reasoning</think> 4") == 0.0
    with pytest.raises(RewardSpecError, match="think_tag"):
        load_reward("format", think_tag="<bad>")


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name"]}


def test_json_valid_and_schema_from_row_or_option():
    j = load_reward("json")
    assert one(j, '{"a": 1}') == 1.0
    assert one(j, 'Here:\n```json\n{"a": [1, 2]}\n```\nDone') == 1.0
    assert one(j, '{"a": 1') == 0.0
    assert one(j, "[" * 100000 + "]" * 100000) == 0.0            # too long / too deep: 0, no crash
    assert one(j, '{"name": "x", "age": 3}', schema=SCHEMA) == 1.0
    assert one(j, '{"name": "x", "age": "3"}', schema=json.dumps(SCHEMA)) == 0.0   # schema as a string
    opt = load_reward("json", schema=SCHEMA, schema_fail=0.5)
    assert one(opt, '{"age": 3}') == 0.5 and one(opt, '{"name": "n"}') == 1.0 and one(opt, "nope") == 0.0
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        one(j, "{}", schema={"type": "no-such-type"})
    with pytest.raises(RewardSpecError, match="not a valid JSON Schema"):
        load_reward("json", schema={"type": 5})


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"], "additionalProperties": False}}},
    {"name": "now", "parameters": {"type": "object", "properties": {}}}]


def call(name, args):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


def test_tool_calls_against_declared_tools():
    t = load_reward("tool_call")
    assert one(t, call("get_weather", {"city": "Oslo", "days": 2}), tools=TOOLS) == 1.0
    assert one(t, call("now", {}) + " and " + call("get_weather", {"city": "Oslo"}), tools=json.dumps(TOOLS)) == 1.0
    assert one(t, call("get_weather", {"days": 2}), tools=TOOLS) == 0.0              # missing required
    assert one(t, call("get_weather", {"city": "Oslo", "days": 0}), tools=TOOLS) == 0.0
    assert one(t, call("get_weather", {"city": "Oslo", "extra": 1}), tools=TOOLS) == 0.0
    assert one(t, call("launch_missiles", {}), tools=TOOLS) == 0.0                   # undeclared tool
    assert one(t, call("now", {}) + "<tool_call>{not json}</tool_call>", tools=TOOLS) == 0.5
    args_as_string = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>'
    assert one(t, args_as_string, tools=TOOLS) == 1.0
    assert one(t, "no call", tools=TOOLS) == 0.0
    assert one(load_reward("tool_call", no_call=0.3), "no call", tools=TOOLS) == 0.3
    with pytest.raises(KeyError, match="tools"):
        one(t, call("now", {}))


def test_unclosed_tags_are_linear_time():
    import time

    t0 = time.monotonic()
    assert one(load_reward("tool_call"), "</tool_call>" + "<tool_call>" * 9000, tools=TOOLS) == 0.0
    assert one(load_reward("format", partial=True), "<think>" * 20000) == pytest.approx(0.0)
    assert one(load_reward("json"), "```json\n" * 12000) == 0.0
    assert time.monotonic() - t0 < 1.0


def test_overlong_dapo_ramp_in_tokens_and_words():
    o = load_reward("overlong", max_len=100, buffer=20)
    assert [one(o, "", completion_tokens=n) for n in (10, 80, 90, 95, 100, 130)] == \
        [0.0, 0.0, -0.5, -0.75, -1.0, -1.0]
    assert one(o, "", num_tokens=list(range(90))) == -0.5                       # token id list
    assert one(o, "w " * 90) == -0.5                                             # no token field: words
    c = load_reward("overlong", max_len=10, buffer=5, unit="chars", penalty=2.0)
    assert one(c, "x" * 8) == pytest.approx(-1.2)
    tok = load_reward("overlong", max_len=10, buffer=5, unit="tokens")
    with pytest.raises(KeyError, match="completion_tokens"):
        one(tok, "x")


def test_soft_length_penalty():
    length = load_reward("length", target=100, coef=0.5, max_penalty=0.4)
    assert one(length, "", completion_tokens=100) == 0.0
    assert one(length, "", completion_tokens=150) == pytest.approx(-0.25)
    assert one(length, "", completion_tokens=1000) == pytest.approx(-0.4)
    with pytest.raises(RewardSpecError, match="unit"):
        load_reward("length", target=10, unit="bytes")
