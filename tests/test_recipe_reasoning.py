"""The reasoning recipe: the `wordproblems` task and its checker, the SFT corpus, and the whole chain of
bench/recipe_reasoning.py at toy sizes (corpus -> SFT -> held-out eval -> GRPO -> resume -> bf16 state -> report)."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from model.errors import ConfigError
from rewards import load_reward
from rl.train.chat import encode_chat
from rl.grpo.reasoning_tasks import WordProblemTask, chat_prompt, sft_record, write_sft_corpus
from rl.grpo.tasks import make_task
from rollout.tokenizer import MIN_VOCAB, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")


def check_solution(row: dict) -> None:
    """Every scratchpad line is true arithmetic, each line uses the count the previous one produced
    (packs: the product feeds the next line), and the last line's result is the answer."""
    *lines, last = row["solution"].split("\n")
    assert last == f"answer: {row['answer']}"
    count = int(re.search(r" has (\d+) ", row["question"]).group(1))
    pending = None
    for i, ln in enumerate(lines):
        a, op, b, c = LINE.match(ln).groups()
        a, b, c = int(a), int(b), int(c)
        assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] and (op != "/" or a % b == 0)
        assert 0 <= c <= 999
        if pending is not None:                 # the line after a pack product adds it to the count
            assert (a, op, b) == (count, "+", pending)
            count, pending = c, None
        elif op == "*" and i + 1 < len(lines) and lines[i + 1].startswith(f"{count}+{c}="):
            pending = c                         # "buys b packs of c": the product first
        else:                                   # an operation on the running count
            assert a == count
            count = c
    assert pending is None
    assert str(count) == row["answer"]


def test_rows_have_true_worked_solutions_and_ops_in_range():
    t = WordProblemTask(seed=0, min_ops=1, max_ops=4)
    seen_ops, kinds = set(), set()
    for i in range(400):
        r = t.row("train", i)
        check_solution(r)
        seen_ops.add(r["ops"])
        kinds |= {m.group(2) for m in map(LINE.match, r["solution"].split("\n")[:-1])}
        assert r["question"].count(".") == r["ops"] + 1 and r["question"].endswith("have now?")
    assert seen_ops == {1, 2, 3, 4} and kinds == {"+", "-", "*", "/"}


def test_deterministic_and_held_out_by_problem_and_difficulty():
    t, same, other = (WordProblemTask(seed=s, min_ops=2, max_ops=3, eval_ops=(4, 4)) for s in (1, 1, 2))
    assert t.rows("train", 0, 30) == [same.row("train", i) for i in range(30)]
    assert [r["question"] for r in t.rows("train", 0, 30)] != [r["question"] for r in other.rows("train", 0, 30)]
    train = t.rows("train", 0, 2000)
    held = t.rows("eval", 0, 300)
    assert {r["ops"] for r in train} == {2, 3} and {r["ops"] for r in held} == {4}
    assert not ({r["question"] for r in train} & {r["question"] for r in held})
    assert all(t.held_out(r["question"]) for r in held) and not any(t.held_out(r["question"]) for r in train)
    for r in held[:50]:
        check_solution(r)
    # the same options without eval_ops: eval problems are the held-out hash bucket of the train range
    u = WordProblemTask(seed=1, min_ops=2, max_ops=3)
    assert {r["ops"] for r in u.rows("eval", 0, 100)} == {2, 3}


def test_make_task_builds_it_and_rejects_bad_options():
    t = make_task("wordproblems", seed=3, min_ops=2, max_ops=4, eval_ops=[3, 4])
    assert isinstance(t, WordProblemTask) and t.eval_ops == (3, 4)
    for bad in ({"min_ops": 0}, {"min_ops": 3, "max_ops": 2}, {"eval_ops": [2]}, {"eval_ops": [0, 3]},
                {"max_value": 50}, {"eval_fraction": 1.0}, {"nope": 1}):
        with pytest.raises(ConfigError, match="task.kwargs"):
            make_task("wordproblems", **bad)


def test_the_math_reward_scores_the_worked_solution_and_not_a_wrong_one():
    t = WordProblemTask(seed=0, min_ops=2, max_ops=4)
    math = load_reward("math")
    rows = t.rows("train", 0, 40)
    right = [r["solution"] + "<|im_end|>" for r in rows]
    wrong = [r["solution"].rsplit(" ", 1)[0] + f" {int(r['answer']) + 1}" for r in rows]
    fields = [{"answer": r["answer"]} for r in rows]
    assert math([r["prompt"] for r in rows], right, fields) == [1.0] * 40
    assert math([r["prompt"] for r in rows], wrong, fields) == [0.0] * 40


def test_sft_record_renders_the_grpo_prompt_then_the_solution(tmp_path):
    """The conversation the SFT stage trains on starts with exactly the text GRPO samples from, and the
    assistant tokens (the loss) are the solution and the end of turn."""
    t = WordProblemTask(seed=0, min_ops=1, max_ops=3)
    tok = build_tiny_tokenizer(MIN_VOCAB)
    row = t.row("train", 5)
    assert row["prompt"] == chat_prompt(row["question"])
    enc = encode_chat(sft_record(row)["messages"], tok)
    assert enc.text.startswith(row["prompt"]) and enc.text[len(row["prompt"]):].startswith(row["solution"])
    p = tok.encode(row["prompt"], add_special_tokens=False)
    assert enc.input_ids[:len(p)] == p and not any(enc.assistant_mask[:len(p)])
    taught = tok.decode([i for i, m in zip(enc.input_ids, enc.assistant_mask) if m])
    assert taught == row["solution"] + "<|im_end|>"

    path = write_sft_corpus(tmp_path / "c" / "sft.jsonl", t, 25, start=100)
    lines = path.read_text().splitlines()
    assert len(lines) == 25 and json.loads(lines[0]) == sft_record(t.row("train", 100))
    with pytest.raises(ConfigError):
        write_sft_corpus(tmp_path / "x.jsonl", t, 0)


def test_recipe_configs_load_and_describe_a_model_of_at_least_50m_parameters():
    from model.config import BitMambaConfig
    from model.info import size_summary
    from model.typed import load_config
    from rl.grpo.config import load_grpo_config
    from rl.train.sft import SFTConfig

    sft = load_config(SFTConfig, ROOT / "configs" / "recipe_reasoning_sft.yaml")
    grpo = load_grpo_config(ROOT / "configs" / "recipe_reasoning_grpo.yaml")
    n = size_summary(BitMambaConfig.preset(sft.model.preset, **sft.model.overrides))["parameters"]
    assert n["total"] >= 50e6 and n["ternary"] > 0.9 * n["total"]
    assert sft.tokenizer.tiny_vocab_size == MIN_VOCAB <= sft.model.overrides["vocab_size"]
    assert grpo.task.eval_size * grpo.eval_samples >= 256 * 4
    assert grpo.learner.num_gpus == grpo.workers.num_gpus == 0.5 and grpo.model.backend == "auto"
    assert grpo.learner.lr_schedule == "constant"      # the windows move cfg.steps: the schedule must not care
    assert grpo.model.path == str(Path(sft.output_dir) / "final")
    task = make_task(grpo.task.name, seed=grpo.seed, **grpo.task.kwargs)
    tok = build_tiny_tokenizer(MIN_VOCAB)
    limit = grpo.model.max_seq_len - grpo.sampling.max_new_tokens - 1
    longest = max(len(tok.encode(task.row("eval", i)["prompt"], add_special_tokens=False)) for i in range(2000))
    assert longest <= limit                             # no held-out prompt is dropped for length


def _script():
    spec = importlib.util.spec_from_file_location("recipe_reasoning", ROOT / "bench" / "recipe_reasoning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_window_estimate_counts_a_cold_start_and_the_eval():
    mod = _script()
    recs = [{"step": 0, "time/eval": 9.0}] + [{"step": s, "time/step": 2.0} for s in range(1, 10)]
    recs[1]["time/step"] = 60.0                          # the first step compiled
    recs[5]["time/eval"] = 5.0
    assert mod.window_seconds([], 10, warm=True) is None
    assert mod.window_seconds(recs, 10, warm=True) == pytest.approx(10 * 2.0 + 7.0 + 10.0)
    assert mod.window_seconds(recs, 10, warm=False) == pytest.approx(9 * 2.0 + 60.0 + 7.0 + 10.0)


TOY = ["--corpus-size", "200", "--sft-steps", "8", "--budget-s", "1500",
       "--sft", "model.preset=tiny", "--sft", "model.overrides={vocab_size: 272}", "--sft", "train.batch_size=8",
       "--sft", "train.save_every=4", "--sft", "train.log_every=2",
       "--grpo", "task.kwargs={min_ops: 1, max_ops: 2, eval_ops: [2, 2]}", "--grpo", "model.max_seq_len=224",
       "--grpo", "sampling.max_new_tokens=16", "--grpo", "prompts_per_step=2", "--grpo", "group_size=2",
       "--grpo", "eval_every=2", "--grpo", "checkpoint_every=2", "--grpo", "task.eval_size=4",
       "--grpo", "eval_samples=2", "--grpo", "eval_k=2", "--grpo", "learner.num_gpus=0", "--grpo", "workers.num_gpus=0",
       "--grpo", "workers.engine_slots=8", "--grpo", "reward_pool.num_workers=1", "--grpo", "learner.num_cpus=1",
       "--grpo", "workers.num_cpus=1", "--grpo", "learner.micro_batch_tokens=4096"]


@pytest.mark.long
@pytest.mark.slow
def test_the_chain_runs_resumes_and_reports(tmp_path, capsys):
    """Invocation 1: corpus, SFT, held-out eval of the SFT model, GRPO to step 2. Invocation 2 (GRPO now
    asks for 4 steps): SFT and the before-eval are not redone, GRPO resumes at step 2, then the bf16-state
    run; the report holds both evals, the mismatch KL of both states and the step time breakdown."""
    import ray

    mod = _script()
    run, res = tmp_path / "run", tmp_path / "results"
    common = ["--run-dir", str(run), "--results-dir", str(res), *TOY]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert mod.main([*common, "--grpo", "steps=2", "--bf16-state-steps", "0"]) == 0
        first = json.loads((res / "recipe_reasoning.json").read_text())
        assert first["complete"] and first["grpo"]["steps_done"] == 2
        sft_mtime = (run / "sft" / "final" / "model.safetensors").stat().st_mtime
        assert mod.main([*common, "--grpo", "steps=4", "--bf16-state-steps", "1"]) == 0
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert "held-out pass@1 before GRPO: " in out and "held-out pass@1 after GRPO:  " in out
    assert (run / "sft" / "final" / "model.safetensors").stat().st_mtime == sft_mtime   # SFT not redone
    corpus = (run / "data" / "sft.jsonl").read_text().splitlines()
    assert len(corpus) == 200 and "messages" in json.loads(corpus[0])

    rep = json.loads((res / "recipe_reasoning.json").read_text())
    assert rep["complete"] and rep["stages_done"] == {"sft": True, "grpo": True, "bf16_state": True}
    assert rep["sft"]["finished"] and rep["sft"]["steps_logged"] == 8
    inv = rep["invocations"]
    assert [i["before"] for i in inv] == [{"sft_steps": 0, "grpo_steps": 0}, {"sft_steps": 8, "grpo_steps": 2}]
    assert [i["after"] for i in inv] == [{"sft_steps": 8, "grpo_steps": 2}, {"sft_steps": 8, "grpo_steps": 4}]
    assert rep["model"]["parameters"]["total"] > 0
    h = rep["heldout"]
    assert h["before"]["step"] == 0 and h["after"]["step"] == 4 and h["gain"] is not None
    assert [p["step"] for p in h["curve"]] == [0, 2, 4]          # the before-eval is logged once
    assert all(0.0 <= p["pass@1"] <= 1.0 and "pass@2" in p for p in h["curve"])
    assert [s for s, _ in rep["train_reward"]] == [1, 2, 3, 4]
    assert rep["mismatch_kl"]["fp32_state"]["n"] == 4 and rep["mismatch_kl"]["bf16_state"]["n"] == 1
    for k in ("time/generate", "time/learn", "time/sync", "time/step"):
        assert rep["step_time"][k]["median"] > 0.0, k
    assert set(rep["step_time"]["share_of_median_step"]) >= {"time/generate", "time/learn", "time/sync"}
    before = json.loads((run / "eval_before.json").read_text())
    assert before["eval/pass@1"] == h["before"]["pass@1"]
    for name in ("recipe_reasoning.png", "recipe_reasoning_grpo_metrics.jsonl", "recipe_reasoning_sft_metrics.jsonl",
                 "recipe_reasoning_bf16_state_metrics.jsonl"):
        assert (res / name).stat().st_size > 0, name
