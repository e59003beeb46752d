"""rl.train.data (loading, packing with seq_idx, exact resume, SFT collation) and rl.train.chat (ChatML + mask)."""

import json

import pytest
import torch

from model.errors import DataError
from rl.train.chat import encode_chat, render_chat
from rl.train.data import (
    IGNORE_INDEX,
    DataSource,
    PackedLoader,
    SFTLoader,
    collate_sft,
    load_records,
    pack_documents,
)


@pytest.fixture(scope="module")
def tok():
    from rollout.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(384)


def _write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


# ----------------------------------------------------------------------------- loading


def test_load_local_formats(tmp_path):
    j = _write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    assert len(load_records(str(j))) == 5
    (tmp_path / "b.txt").write_text("line one\nline two\nline three\n")
    assert load_records(str(tmp_path / "b.txt"))["text"][:2] == ["line one", "line two"]
    import datasets

    datasets.Dataset.from_dict({"text": ["x", "y"]}).to_parquet(str(tmp_path / "c.parquet"))
    assert load_records(str(tmp_path / "c.parquet"))["text"] == ["x", "y"]
    (tmp_path / "d.json").write_text(json.dumps([{"text": "p"}, {"text": "q"}]))
    assert len(load_records(str(tmp_path / "d.json"))) == 2
    streamed = load_records(DataSource(path=str(j), streaming=True))
    assert [r["text"] for r in streamed] == [f"doc {i}" for i in range(5)]
    assert len(load_records(DataSource(path=str(j), max_records=2))) == 2


def test_broken_jsonl_line_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok2"}\n{"text": broken\n{"text": "ok3"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        load_records(str(p))


def test_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty dataset"):
        load_records(str(tmp_path / "empty.jsonl"))
    (tmp_path / "zero.jsonl").write_text("")
    with pytest.raises(DataError, match="empty dataset"):
        load_records(str(tmp_path / "zero.jsonl"))


# ----------------------------------------------------------------------------- packing


def test_pack_documents_seq_idx_and_labels():
    rows = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos=0)
    # stream: 1 2 3 0 | 4 5 0 | 6 7 8 9 0  -> rows of 5 tokens with step 4
    inp, lab, sidx = rows[0]
    assert inp.tolist() == [1, 2, 3, 0] and lab.tolist() == [2, 3, 0, IGNORE_INDEX]
    assert sidx.dtype == torch.int32 and sidx.tolist() == [0, 0, 0, 0]
    inp, lab, sidx = rows[1]
    assert inp.tolist() == [4, 5, 0, 6] and sidx.tolist() == [0, 0, 0, 1]
    assert lab.tolist() == [5, 0, IGNORE_INDEX, 7]


def test_packed_loader_boundaries_and_exact_resume(tmp_path, tok):
    docs = [{"text": f"document number {i} " + "word " * (i % 7)} for i in range(40)]
    src = DataSource(path=str(_write_jsonl(tmp_path / "p.jsonl", docs)))
    mk = lambda: PackedLoader([(src, load_records(src))], tok, seq_len=32, batch_size=3, seed=5)  # noqa: E731
    a = mk()
    first = [a.next_batch() for _ in range(4)]
    state = json.loads(json.dumps(a.state_dict()))
    rest = [a.next_batch() for _ in range(10)]  # crosses an epoch boundary (40 short docs)
    assert a.state_dict()["sources"]["p"]["epoch"] >= 1
    b = mk()
    b.load_state_dict(state)
    for x, y in zip(rest, [b.next_batch() for _ in range(10)]):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.seq_idx, y.seq_idx)
        assert torch.equal(x.labels, y.labels)
    bt = first[0]
    assert bt.input_ids.shape == (3, 32) and bt.seq_idx.dtype == torch.int32
    eos = tok.eos_token_id
    # a new document starts right after each EOS input, and its first token is never a label
    for r in range(3):
        ids, sidx, lab = bt.input_ids[r], bt.seq_idx[r], bt.labels[r]
        for t in range(31):
            if ids[t] == eos:
                assert sidx[t + 1] == sidx[t] + 1 and lab[t] == IGNORE_INDEX
            else:
                assert sidx[t + 1] == sidx[t]
    assert int(bt.seq_idx.max()) > 0


def test_mixture_and_phase_switch(tmp_path, tok):
    a = DataSource(path=str(_write_jsonl(tmp_path / "aa.jsonl", [{"text": "aaaa aaaa"}] * 10)), name="A")
    b = DataSource(path=str(_write_jsonl(tmp_path / "bb.jsonl", [{"text": "bbbb bbbb"}] * 10)), name="B")
    ld = PackedLoader([(a, load_records(a)), (b, load_records(b))], tok, seq_len=16, batch_size=8, seed=0,
                      mixture={"A": 1.0, "B": 0.0})
    a_ids = set(tok.encode("aaaa aaaa", add_special_tokens=False))
    b_ids = set(tok.encode("bbbb bbbb", add_special_tokens=False)) - a_ids
    x = ld.next_batch().input_ids
    assert not (set(x.flatten().tolist()) & b_ids)
    ld.set_phase({"B": 1.0}, seq_len=24)
    x = ld.next_batch().input_ids
    assert x.shape == (8, 24) and not (set(x.flatten().tolist()) & (a_ids - b_ids - {tok.eos_token_id}))
    with pytest.raises(DataError, match="unknown source 'C'"):
        ld.set_phase({"C": 1.0}, 16)


# ----------------------------------------------------------------------------- chat + SFT


CONV = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "reasoning": "2 plus 3 is 5.", "content": "", "tool_calls": [
        {"name": "calc", "arguments": {"expr": "2+3"}}]},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "The answer is 5."},
]


def test_chatml_render():
    text = render_chat(CONV)
    assert text.startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n")
    assert "<|im_start|>assistant\n<think>\n2 plus 3 is 5.\n</think>\n\n<tool_call>\n" in text
    assert '{"name": "calc", "arguments": {"expr": "2+3"}}' in text
    assert "<|im_start|>tool\n5<|im_end|>\n" in text
    off = render_chat(CONV, reasoning=False)
    assert "2 plus 3" not in off and "<think>\n\n</think>\n\n<tool_call>" in off
    gen = render_chat(CONV[:2], add_generation_prompt=True, reasoning=False)
    assert gen.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with pytest.raises(DataError, match="message 1: unknown role 'bot'"):
        render_chat([CONV[0], {"role": "bot", "content": "x"}])


def test_chatml_prompt_template_and_tokens_agree(tok):
    """`rollout.chatml.chat_prompt`, the SFT renderer's generation prompt and the tokenizer's chat template
    give the same text, and every ChatML marker is one token of the tiny tokenizer."""
    from rollout import chatml

    q = "What is 2+3?\nThink."
    user = [{"role": "user", "content": q}]
    assert chatml.chat_prompt(q) == render_chat(user, add_generation_prompt=True)
    assert chatml.chat_prompt(q) == tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert chatml.chat_prompt(q) == "<|im_start|>user\nWhat is 2+3?\nThink.<|im_end|>\n<|im_start|>assistant\n"
    for marker in (chatml.IM_START, chatml.IM_END, chatml.THINK_START, chatml.THINK_END, chatml.TOOL_CALL_START,
                   chatml.TOOL_CALL_END, chatml.TOOL_RESPONSE_START, chatml.TOOL_RESPONSE_END):
        assert len(tok.encode(marker, add_special_tokens=False)) == 1, marker


def test_chat_mask_only_assistant_tokens(tok):
    enc = encode_chat(CONV, tok)
    assert tok.decode(enc.input_ids) == enc.text  # specials are single tokens; pieces re-join exactly
    asst = tok.decode([i for i, m in zip(enc.input_ids, enc.assistant_mask) if m])
    other = tok.decode([i for i, m in zip(enc.input_ids, enc.assistant_mask) if not m])
    assert asst == ("<think>\n2 plus 3 is 5.\n</think>\n\n<tool_call>\n"
                    '{"name": "calc", "arguments": {"expr": "2+3"}}\n</tool_call><|im_end|>'
                    "The answer is 5.<|im_end|>")
    assert "You are helpful." in other and "What is 2+3?" in other and "assistant\n" in other
    assert "The answer" not in other


def test_collate_sft_pads_to_longest_and_masks(tok):
    e1 = encode_chat(CONV, tok)
    e2 = encode_chat(CONV[:2] + [{"role": "assistant", "content": "5"}], tok)
    batch = collate_sft([(e1.input_ids, e1.assistant_mask), (e2.input_ids, e2.assistant_mask)], pad=tok.pad_token_id)
    T = max(len(e1.input_ids), len(e2.input_ids)) - 1
    assert batch.input_ids.shape == (2, T)
    n2 = len(e2.input_ids) - 1
    assert (batch.input_ids[1, n2:] == tok.pad_token_id).all() and (batch.labels[1, n2:] == IGNORE_INDEX).all()
    # labels are the next token exactly where that token is an assistant token
    for t in range(n2):
        want = e2.input_ids[t + 1] if e2.assistant_mask[t + 1] else IGNORE_INDEX
        assert batch.labels[1, t] == want
    assert batch.n_tokens == sum(e1.assistant_mask[1:]) + sum(e2.assistant_mask[1:])
    assert tok.decode(batch.labels[1][batch.labels[1] != IGNORE_INDEX]) == "5<|im_end|>"


def test_sft_loader_reasoning_share_and_resume(tmp_path, tok):
    recs = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "reasoning": "THINKING", "content": f"a{i}"}]} for i in range(20)]
    src = DataSource(path=str(_write_jsonl(tmp_path / "s.jsonl", recs)))
    ds = load_records(src)
    think_id = tok.encode("THINKING", add_special_tokens=False)[0]
    ld = SFTLoader(ds, tok, batch_size=4, max_len=64, seed=1, reasoning_off_share=0.5)
    batches = [ld.next_batch() for _ in range(5)]
    with_reasoning = sum(int((b.input_ids == think_id).any(dim=1).sum()) for b in batches)
    assert 3 <= with_reasoning <= 17  # about half of 20 samples keep their reasoning
    ld2 = SFTLoader(ds, tok, batch_size=4, max_len=64, seed=1, reasoning_off_share=0.5)
    ld2.load_state_dict(json.loads(json.dumps({"epoch": 0, "index": 12})))
    assert torch.equal(ld2.next_batch().input_ids, batches[3].input_ids)
    assert all(b.input_ids.shape[1] <= 64 for b in batches)


def test_streaming_packed_loader_resumes_across_epochs(tmp_path, tok):
    docs = [{"text": f"streamed document {i} " + "more words " * (i % 5)} for i in range(12)]
    src = DataSource(path=str(_write_jsonl(tmp_path / "st.jsonl", docs)), streaming=True)
    mk = lambda: PackedLoader([(src, load_records(src))], tok, seq_len=32, batch_size=2, seed=3)  # noqa: E731
    a = mk()
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    rest = [a.next_batch() for _ in range(12)]
    assert a.state_dict()["sources"]["st"]["epoch"] >= 1
    b = mk()
    b.load_state_dict(state)
    assert all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.seq_idx, y.seq_idx)
               for x, y in zip(rest, [b.next_batch() for _ in range(12)]))
