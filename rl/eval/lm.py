"""lm-eval adapter: a BitMamba checkpoint as an `lm_eval` model, registered as "bitmamba".

    import rl.eval.lm                                    # registers "bitmamba" with lm-eval
    lm_eval.simple_evaluate(model="bitmamba", model_args="pretrained=runs/ckpt,batch_size=16", tasks=[...])
    lm_eval.simple_evaluate(model=BitMambaEvalLM(model=m, tokenizer=tok), tasks=[...])

What each request type computes (all log-probs fp32 log_softmax of the model's logits):
- `loglikelihood` (multiple choice): requests are grouped by their context tokens. Each distinct
  context is prefilled once (a batch of contexts is left-padded, and `seq_idx` starts a new document at
  the first real token, so the recurrent state after the context is exactly the unpadded one); the
  logits after the context score the first continuation token; the state is then copied to one row
  per continuation (`ModelState.select`) and `forward(cont[:-1], state=...)` scores the rest.
  Models with attention layers are batched by equal context length instead (no padding in a KV cache).
  `reuse_prefix=False` scores each request by one full forward over context + continuation (the
  straightforward way; the tests compare the two).
- `loglikelihood_rolling` (perplexity): [prefix token] + document, scored in windows of `max_length`
  tokens with the recurrent state carried across windows, so every token is conditioned on the whole
  document before it (exact, unlike a transformer's sliding windows).
- `generate_until`: `rollout.Engine` (fast decode backend on CUDA) with the task's stop strings;
  the returned text is cut before the first stop string, as lm-eval expects.

Contexts are not truncated (the model is recurrent); long inputs are prefilled in `max_length`-token
windows. Precision (`dtype`): on CUDA the default is fp32 with TF32 matmuls ("tf32"): the eval path's
int8 activations x ternary codes are exact in TF32 (7-bit integers fit its 10-bit mantissa, fp32
accumulation), so it gives the fp32 numbers, and on an H100 it was faster than bf16 autocast, whose
bf16 matmul outputs moved log-likelihoods by up to ~0.2 nats on the 1B shape. "bfloat16" autocast is
available; CPU runs fp32.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from torch import Tensor

from model.errors import BitMambaError, ConfigError
from model.lm import BitMambaLM
from model.state import ModelState

log = logging.getLogger(__name__)

HEAD_CHUNK = 1024  # tokens per head / log_softmax chunk (bounds the fp32 [tokens, V] logits)


@dataclass
class _Scored:
    logprob: float
    greedy: bool


def score_positions(model: BitMambaLM, h: Tensor, targets: Tensor, chunk: int = HEAD_CHUNK) -> tuple[Tensor, Tensor]:
    """h [B, T, d] (final-normed hidden states), targets [B, T] -> (log p(target) fp32 [B, T],
    target == argmax bool [B, T]). The head runs over `chunk` tokens at a time."""
    B, T, d = h.shape
    hf, tg = h.reshape(-1, d), targets.reshape(-1)
    lps, greedy = [], []
    for s in range(0, hf.shape[0], chunk):
        logp = torch.log_softmax(model.lm_head(hf[s:s + chunk]).float(), dim=-1)  # [c, V]
        t = tg[s:s + chunk]
        lps.append(logp.gather(-1, t[:, None]).squeeze(-1))
        greedy.append(logp.argmax(-1) == t)
    return torch.cat(lps).reshape(B, T), torch.cat(greedy).reshape(B, T)


def _pad_right(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[Tensor, Tensor]:
    """-> ids [B, L] right-padded with `pad`, valid mask [B, L] bool."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    valid = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        valid[i, :len(s)] = True
    return ids.to(device), valid.to(device)


class LogLikelihoodScorer:
    """The adapter's numerics, free of lm-eval: usable (and tested) on a bare `BitMambaLM`.

    batch_size: contexts prefilled together (multiple choice) / documents per rolling batch.
    max_length: tokens per forward window (prefill and rolling perplexity); the state carries over.
    """

    def __init__(self, model: BitMambaLM, batch_size: int = 16, max_length: int = 2048,
                 autocast_dtype: torch.dtype | None = None, pad_id: int = 0, tf32: bool = False):
        if batch_size < 1 or max_length < 1:
            raise ConfigError(f"batch_size ({batch_size}) and max_length ({max_length}) must be >= 1")
        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length
        self.autocast_dtype = autocast_dtype
        self.tf32 = tf32
        self.pad_id = pad_id
        self.has_attention = bool(model.config.attention_layer_indices)
        self.stats = {"forward_tokens": 0, "prefills": 0, "requests": 0}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextlib.contextmanager
    def _autocast(self):
        """bf16 autocast and/or TF32 matmuls for the duration of one forward (global flag restored)."""
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.tf32 or old
        try:
            if self.autocast_dtype is None:
                yield
            else:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old

    def _hidden(self, ids: Tensor, state: ModelState | None, seq_idx: Tensor | None = None) -> Tensor:
        self.stats["forward_tokens"] += ids.numel()
        with self._autocast():
            return self.model.hidden_states(ids, seq_idx=seq_idx, state=state)

    def _score(self, h: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        with self._autocast():
            return score_positions(self.model, h, targets)

    # ---- multiple choice -------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                      reuse_prefix: bool = True) -> list[tuple[float, bool]]:
        """pairs of (context ids, continuation ids), both non-empty -> [(sum log p(cont | ctx), is_greedy)]."""
        for i, (ctx, cont) in enumerate(pairs):
            if len(ctx) == 0 or len(cont) == 0:
                raise BitMambaError(f"loglikelihood request {i}: empty context or continuation "
                                    f"({len(ctx)} / {len(cont)} tokens)")
        self.stats["requests"] += len(pairs)
        out = self._shared_prefix(pairs) if reuse_prefix else self._full_forward(pairs)
        return [(s.logprob, s.greedy) for s in out]

    def _full_forward(self, pairs) -> list[_Scored]:
        """One forward over ctx + cont[:-1] per request (right-padded batches; causal, so exact)."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        out: list[_Scored | None] = [None] * len(pairs)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            seqs = [list(pairs[i][0]) + list(pairs[i][1]) for i in idx]
            ids, valid = _pad_right(seqs, self.pad_id, self.device)
            h = self._hidden(ids[:, :-1], None)
            lp, gr = self._score(h, ids[:, 1:])
            lp, gr = lp.cpu(), gr.cpu()   # one device sync per batch
            for r, i in enumerate(idx):
                a, b = len(pairs[i][0]) - 1, len(pairs[i][0]) + len(pairs[i][1]) - 1
                out[i] = _Scored(float(lp[r, a:b].sum()), bool(gr[r, a:b].all()))
        return out  # type: ignore[return-value]

    def _context_batches(self, contexts: list[tuple[int, ...]]) -> list[list[int]]:
        """Indices into `contexts`, longest first, in batches; equal lengths only with attention layers."""
        order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
        batches: list[list[int]] = []
        for i in order:
            if (batches and len(batches[-1]) < self.batch_size
                    and (not self.has_attention or len(contexts[batches[-1][0]]) == len(contexts[i]))):
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    def _prefill(self, ctxs: list[tuple[int, ...]], max_len: int) -> tuple[Tensor, ModelState]:
        """Left-padded batched prefill -> (final hidden state after each context [B, d], state [B rows])."""
        B, L = len(ctxs), max(len(c) for c in ctxs)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        seq_idx = torch.ones((B, L), dtype=torch.int32)
        for r, c in enumerate(ctxs):
            ids[r, L - len(c):] = torch.as_tensor(c, dtype=torch.long)
            seq_idx[r, :L - len(c)] = 0
        padded = bool((seq_idx == 0).any())
        ids, seq_idx = ids.to(self.device), seq_idx.to(self.device)
        state = self.model.allocate_state(B, max_len, device=self.device)
        h_last = None
        n_pad = torch.as_tensor([L - len(c) for c in ctxs], device=self.device)
        for s in range(0, L, self.max_length):
            e = min(L, s + self.max_length)
            if s > 0 and padded:  # rows whose first real token opens this window: drop the padding's state
                starting = torch.nonzero(n_pad == s).flatten()
                if starting.numel():
                    state.reset_rows_(starting)
            sq = seq_idx[:, s:e] if padded and bool((seq_idx[:, s:e] == 0).any()) else None
            h_last = self._hidden(ids[:, s:e], state, sq)[:, -1]
        self.stats["prefills"] += B
        return h_last, state

    def _shared_prefix(self, pairs) -> list[_Scored]:
        by_ctx: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            by_ctx.setdefault(tuple(ctx), []).append(i)
        contexts = list(by_ctx)
        out: list[_Scored | None] = [None] * len(pairs)
        for batch in self._context_batches(contexts):
            ctxs = [contexts[b] for b in batch]
            reqs = [by_ctx[c] for c in ctxs]  # request indices per context row
            max_cont = max(len(pairs[i][1]) for rs in reqs for i in rs)
            h_last, state = self._prefill(ctxs, max(len(c) for c in ctxs) + max_cont + 1)
            # first continuation token: from the logits after the context
            rows = [r for r, rs in enumerate(reqs) for _ in rs]
            flat = [i for rs in reqs for i in rs]
            first = torch.as_tensor([pairs[i][1][0] for i in flat], dtype=torch.long, device=self.device)
            lp0, gr0 = self._score(h_last[rows][:, None], first[:, None])
            for i, lp_i, gr_i in zip(flat, lp0[:, 0].tolist(), gr0[:, 0].tolist()):
                out[i] = _Scored(lp_i, gr_i)
            # the rest: one state row per continuation, continued over cont[:-1]
            rest = [(r, i) for r, i in zip(rows, flat) if len(pairs[i][1]) > 1]
            cb = 4 * self.batch_size
            for s in range(0, len(rest), cb):
                part = rest[s:s + cb]
                sub = state.select(torch.as_tensor([r for r, _ in part], device=self.device))
                conts = [list(pairs[i][1]) for _, i in part]
                ids, valid = _pad_right(conts, self.pad_id, self.device)
                h = self._hidden(ids[:, :-1], sub)
                lp, gr = self._score(h, ids[:, 1:])
                v = valid[:, 1:]
                lp_sum = (lp * v).sum(-1).tolist()
                all_gr = (gr | ~v).all(-1).tolist()
                for k, (_, i) in enumerate(part):
                    out[i] = _Scored(out[i].logprob + lp_sum[k], out[i].greedy and all_gr[k])
        return out  # type: ignore[return-value]

    # ---- perplexity ------------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood_rolling(self, docs: Sequence[Sequence[int]], prefix_id: int) -> list[float]:
        """docs of token ids -> sum over the document of log p(token | prefix, earlier tokens)."""
        self.stats["requests"] += len(docs)
        seqs = [[prefix_id] + list(d) for d in docs]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out = [0.0] * len(seqs)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            ids, valid = _pad_right([seqs[i] for i in idx], self.pad_id, self.device)
            inp, tgt, v = ids[:, :-1], ids[:, 1:], valid[:, 1:]
            state = self.model.allocate_state(len(idx), inp.shape[1] + 1, device=self.device)
            total = torch.zeros(len(idx), dtype=torch.float64, device=self.device)
            for w in range(0, inp.shape[1], self.max_length):
                e = w + self.max_length
                # rows already finished only see padding here; their state is never read again
                lp, _ = self._score(self._hidden(inp[:, w:e], state), tgt[:, w:e])
                total += (lp * v[:, w:e]).sum(-1).double()
            for i, t in zip(idx, total.tolist()):
                out[i] = t
        return out


def _resolve_dtype(dtype: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """-> (autocast dtype or None, TF32 matmuls)."""
    if dtype == "auto":
        return None, device.type == "cuda"
    if dtype == "tf32":
        return None, True
    if dtype in ("bfloat16", "bf16"):
        return torch.bfloat16, False
    if dtype in ("float32", "fp32"):
        return None, False
    raise ConfigError(f"dtype: expected auto | tf32 | bfloat16 | float32, got {dtype!r}")


def _as_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


@register_model("bitmamba")
class BitMambaEvalLM(TemplateLM):
    """lm-eval model over a BitMamba checkpoint directory (`pretrained=DIR`, tokenizer in DIR or
    `tokenizer=PATH`), or over objects (`model=BitMambaLM, tokenizer=HF tokenizer`).

    batch_size: contexts per prefill batch; max_length: forward window in tokens; dtype: auto (TF32
    matmuls on CUDA, fp32 on CPU) | tf32 | bfloat16 (autocast) | float32; reuse_prefix: share each context's prefill
    among its continuations; backend: decode backend for generate_until (auto | torch | fast);
    max_gen_toks: default generation length.
    """

    def __init__(self, pretrained: str | None = None, *, model: BitMambaLM | None = None, tokenizer=None,
                 device: str | None = None, batch_size: int | str = 64, max_length: int = 2048,
                 dtype: str = "auto", reuse_prefix: bool | str = True, backend: str = "auto",
                 max_gen_toks: int = 256, **kwargs):
        super().__init__()
        if kwargs:
            log.info("bitmamba: ignoring lm-eval arguments %s", sorted(kwargs))
        from rollout.tokenizer import has_tokenizer, load_tokenizer

        if (pretrained is None) == (model is None):
            raise ConfigError("bitmamba eval model: give exactly one of pretrained=DIR or model=BitMambaLM")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model is None:
            model = BitMambaLM.from_pretrained(pretrained, device=dev)
            if tokenizer is None:
                if not has_tokenizer(pretrained):
                    raise ConfigError(f"{pretrained}: no tokenizer here; pass tokenizer=PATH")
                tokenizer = pretrained
        else:
            model = model.to(dev)
        if tokenizer is None:
            raise ConfigError("bitmamba eval model: a tokenizer is needed (tokenizer=PATH or object)")
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        if self.tokenizer.eos_token_id is None:
            raise ConfigError("bitmamba eval model: the tokenizer has no eos token (used as the prefix token)")
        self.model = model.eval()
        bs = 64 if str(batch_size).startswith("auto") else int(batch_size)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        autocast_dtype, tf32 = _resolve_dtype(dtype, dev)
        self.scorer = LogLikelihoodScorer(self.model, batch_size=bs, max_length=int(max_length),
                                          autocast_dtype=autocast_dtype, tf32=tf32, pad_id=pad)
        self.reuse_prefix = _as_bool(reuse_prefix)
        self.backend_kind = backend
        self.max_gen_toks = int(max_gen_toks)
        self._engine = None

    @property
    def device(self) -> torch.device:
        return self.scorer.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "bitmamba")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's --apply_chat_template: the tokenizer's template (ChatML for the tiny tokenizer)."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        res = self.scorer.loglikelihood(pairs, reuse_prefix=self.reuse_prefix)
        for (key, _, _), r in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(req.args[0]) for req in requests]
        res = self.scorer.loglikelihood_rolling(docs, self.prefix_token_id)
        for req, r in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), r)
        return res

    def _get_engine(self):
        if self._engine is None:
            from rollout.backends import make_backend
            from rollout.engine import Engine

            self._engine = Engine(make_backend(self.model, kind=self.backend_kind), tokenizer=self.tokenizer,
                                  slots=self.scorer.batch_size)
        return self._engine

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from rollout.types import GenRequest, SamplingParams

        gen_reqs, untils = [], []
        for i, req in enumerate(requests):
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            do_sample = _as_bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            params = SamplingParams(max_new_tokens=int(kw.pop("max_gen_toks", self.max_gen_toks)),
                                    temperature=temperature, top_p=float(kw.pop("top_p", 1.0) or 1.0),
                                    stop_strings=[u for u in until if u], eos_token_id=self.eot_token_id,
                                    seed=i)
            ids = self.tok_encode(context) or [self.prefix_token_id]
            gen_reqs.append(GenRequest(ids, params, request_id=i))
            untils.append(until)
        results = self._get_engine().generate(gen_reqs) if gen_reqs else []
        texts = [""] * len(requests)
        for r in results:
            text = r.text if r.text is not None else self.tok_decode(r.token_ids)
            for u in untils[r.request_id]:
                if u:
                    text = text.split(u)[0]
            if r.finish_reason == "eos":
                text = text.replace(self.tokenizer.eos_token, "")
            texts[r.request_id] = text
        for req, t in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, t)
        return texts
