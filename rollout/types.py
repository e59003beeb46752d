"""Requests, sampling parameters and results of the generation engine (`rollout.engine.Engine`).

    params = SamplingParams(max_new_tokens=256, temperature=0.8, n=8, seed=step * 1000 + i,
                            eos_token_id=tok.eos_token_id, stop_strings=["</answer>"])
    results = engine.generate([GenRequest(prompt_ids, params, request_id=i)])

Every `SamplingParams` is validated at construction (`ConfigError` naming the field).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from model.errors import ConfigError

FinishReason = Literal["eos", "stop", "length"]


@dataclass
class SamplingParams:
    """How to sample one request (all its `n` samples).

    max_new_tokens: completion length limit (finish reason "length").
    temperature: 0 -> greedy (argmax of the penalized logits); else logits / temperature.
    top_k: keep the k most likely tokens (0 = off). top_p: nucleus, keep the smallest set whose
    probability reaches top_p (1 = off; the top token is always kept). min_p: drop tokens whose
    probability is below min_p * p(top token) (0 = off).
    repetition_penalty: the published C++ engine's / llama.cpp's rule, for every distinct token in
    prompt + completion: logit / r if logit > 0 else logit * r (1 = off).
    Order: repetition penalty, temperature, top-k, top-p, min-p (each on the result of the previous).
    stop_token_ids: single tokens that end a sample (finish "stop"); eos_token_id ends it with "eos".
    stop_sequences: token-id sequences that end a sample when the completion ends with one.
    stop_strings: end when the decoded completion contains one (needs the engine's tokenizer).
    The token(s) that completed a stop condition are kept in `GenResult.token_ids` (the policy sampled
    them, RL trains on them).
    n: samples per prompt (the prompt is prefilled once and its state copied to n rows).
    seed: the request's seed; sample i draws from a generator seeded by `sample_seed(seed, i)`, so
    a run replays exactly whatever the batch composition.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    stop_sequences: list[list[int]] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    eos_token_id: int | None = None
    n: int = 1
    seed: int = 0

    def __post_init__(self):
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        self.stop_sequences = [[int(t) for t in s] for s in self.stop_sequences]
        self.stop_strings = list(self.stop_strings)
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ConfigError(f"min_p: must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty: must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.n < 1:
            raise ConfigError(f"n: must be >= 1, got {self.n}")
        if any(len(s) == 0 for s in self.stop_sequences):
            raise ConfigError("stop_sequences: empty sequence")
        if any(s == "" for s in self.stop_strings):
            raise ConfigError("stop_strings: empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenRequest:
    """One prompt. `params=None` takes the `params` given to `Engine.generate`.

    group_id / meta are carried through to every `GenResult` untouched (e.g. the dataset row).
    """

    prompt_ids: list[int]
    params: SamplingParams | None = None
    request_id: Any = None
    group_id: Any = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.prompt_ids = list(map(int, self.prompt_ids))   # (numpy / tensor ids -> int; map: 2x faster)
        if not self.prompt_ids:
            raise ConfigError(f"request {self.request_id!r}: empty prompt_ids")


@dataclass
class GenResult:
    """One sample of one request.

    token_ids: the completion (sampled tokens, and injected ones when a pause hook injected any).
    logprobs: log-prob of each token under the sampling distribution actually used (after penalty,
      temperature, top-k/p, min-p; 0.0 for greedy since argmax is deterministic): the behaviour
      policy, the rollout side of the RL importance ratio.
    model_logprobs: log-prob under the unmodified model distribution (log_softmax of the raw logits,
      temperature 1), for diagnostics.
    sampled_mask: 1 for sampled tokens, 0 for injected ones (tool results; their log-probs are 0.0
      and must be masked out of the loss).
    Timing in seconds: prefill_s (this prompt's prefill, shared by its n samples), ttft_s (from the
    `generate` call until the first token of this sample was sampled), decode_s (from the first token
    until the engine saw the sample finish; the engine checks every `sync_every` steps).
    """

    request_id: Any
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    logprobs: list[float]
    model_logprobs: list[float]
    finish_reason: FinishReason
    sampled_mask: list[int] = field(default_factory=list)
    group_id: Any = None
    meta: dict = field(default_factory=dict)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenStats:
    """Whole-call numbers of the last `Engine.generate` (also logged)."""

    n_requests: int = 0
    n_samples: int = 0
    n_prefills: int = 0          # distinct prompts prefilled
    prefill_batches: int = 0     # prefill calls (`prefill_many` batches several prompts into one call)
    prompt_tokens: int = 0
    new_tokens: int = 0          # kept completion tokens (excludes steps discarded past a stop)
    decode_steps: int = 0        # batched step() calls
    idle_slot_steps: int = 0     # slot-steps with no sample in the slot (queue empty, samples parked)
    forced_tokens: int = 0       # tokens fed by forced steps at pauses (window replays + injections)
    pauses: int = 0              # on_stop calls that resumed or parked a sample
    deferred: int = 0            # of those, pauses answered during the next windows (kept their slot; Engine defer)
    rejoined: int = 0            # of those, resumed mid-window, at the first step after the answer (hash noise/greedy)
    parked: int = 0              # of those, pauses not answered by then (left the slot until answered)
    pause_wait_s: float = 0.0    # host time waiting for tool answers at syncs (Engine park_wait_s)
    snapshot_s: float = 0.0      # host time launching the per-sync state snapshots (with on_stop)
    wall_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0
