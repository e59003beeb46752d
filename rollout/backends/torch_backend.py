"""`TorchBackend`: the pure-torch decode backend over a `BitMambaLM` (CPU and GPU): prefill with the model's
parallel forward, steps with `model.step`. It is the reference the fast backend is tested against."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from model.errors import BitMambaError
from model.state import ModelState
from rollout.backends.base import prefill_many, write_rows

if TYPE_CHECKING:
    from model.lm import BitMambaLM


class TorchBackend:
    """Pure-torch backend over a `BitMambaLM` (the reference the fast backend is tested against).

    state_dtype: dtype of the recurrent state (SSM state, conv window, KV cache); fp32 by default
    because rollout/learner log-prob mismatch matters for RL; torch.bfloat16 halves the state traffic.
    """

    def __init__(self, model: "BitMambaLM", state_dtype: torch.dtype = torch.float32,
                 ssm_dtype: torch.dtype | None = None):
        self.model = model
        self.state_dtype = state_dtype
        self.ssm_dtype = ssm_dtype or state_dtype
        self.state: ModelState | None = None
        self.slots = 0
        self.max_len = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def allocate(self, slots: int, max_len: int) -> None:
        """(Re)allocate the slot state for `slots` rows of up to `max_len` tokens (prompt + completion)."""
        if self.state is not None and self.slots == slots and self.max_len == max_len:
            self.state.reset_rows_(torch.arange(slots, device=self.device))
            return
        self.slots, self.max_len = slots, max_len
        self.state = self._new_state(slots)

    def _new_state(self, batch: int) -> ModelState:
        """Zero state; `model.allocate_state` keeps the SSM state fp32, so cast it here when asked."""
        return self.model.allocate_state(batch, self.max_len, dtype=self.state_dtype, device=self.device,
                                         ssm_dtype=self.ssm_dtype)

    def _need_state(self) -> ModelState:
        if self.state is None:
            raise RuntimeError("TorchBackend: call allocate(slots, max_len) first")
        return self.state

    @torch.no_grad()
    def prefill(self, prompt_ids: Tensor) -> tuple[Tensor, ModelState]:
        """prompt_ids [T] -> (fp32 logits after the last prompt token [V], its 1-row state)."""
        self._need_state()
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        if ids.shape[1] >= self.max_len:
            raise BitMambaError(f"prompt of {ids.shape[1]} tokens does not fit max_len {self.max_len}")
        st = self._new_state(1)
        h = self.model.hidden_states(ids, state=st)
        return self.model.lm_head(h[:, -1])[0].float(), st

    @torch.no_grad()
    def prefill_many(self, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, ModelState]:
        """Several prompts in few forwards (see `prefill_many`): -> (fp32 logits [P, V], P-row state)."""
        self._need_state()
        return prefill_many(self.model, prompts, self._new_state, self.max_len)

    @torch.no_grad()
    def load_rows(self, state1: ModelState, rows: Tensor) -> None:
        write_rows(self._need_state(), rows, state1)

    @torch.no_grad()
    def extend(self, rows: Tensor, token_ids: Tensor) -> Tensor:
        """Continue rows [R] over token_ids [R, T] from their current state; -> fp32 logits [R, V]."""
        state = self._need_state()
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(rows.numel(), -1)
        sub = state.select(rows)
        out = self.model(ids, state=sub)
        write_rows(state, rows, sub)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """tokens [slots] -> fp32 logits [slots, V]; every slot's state advances by one token."""
        return self.model.step(tokens.to(self.device, torch.long), self._need_state()).float()

    def refresh_weights(self) -> None:
        """Nothing to re-pack: this backend reads the model's weights directly."""
