"""Rewards for GRPO: plain Python functions, safe built-ins, isolated execution.

Write a reward function as a plain callable in your own file, say ``my_rewards.py``::

    def brevity(prompt: str, completion: str, answer: str, **fields) -> float | None:
        # `answer` and the other keyword arguments are the dataset row's other columns;
        # declare the ones you need (add **fields to receive all of them).
        if not answer:
            return None              # None: exclude this sample from the update
        return 1.0 - min(len(completion), 2000) / 2000

    import rewards

    @rewards.batched                # called once per chunk, with lists (columns for the fields)
    def exact(prompts, completions, answer, **fields):
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    async def judged(prompt, completion, **fields):   # async functions work too
        ...

Reference it from the YAML config (several functions are combined with weights)::

    rewards:
      - spec: math                          # a built-in: math, format, json, tool_call, overlong, length
      - spec: my_rewards.py:brevity         # path/to/file.py:function or package.module:function
        weight: 0.2
        kwargs: {}                          # options: built-in options / extra keyword arguments
        timeout_s: 5                        # per call (default: the pool's, 10 s)

and try it before training: ``bitmamba reward-check my_rewards.py:brevity --data rows.jsonl``
(or ``--config train.yaml`` for the config's whole ``rewards:`` list). See docs/rewards.md.
Loading checks the file, the function and its signature at once (`RewardSpecError` names what is
wrong). During training the functions run in `RewardPool` worker processes: an exception, a hang,
a crash, NaN or a wrong return type gives the fallback reward (0.0) and is counted, never fatal.
"""

from rewards.api import CompositeReward, RewardFn, RewardSpec, batched, load_reward, parse_reward_specs
from rewards.errors import RewardDataError, RewardError, RewardPoolError, RewardSpecError
from rewards.pool import RewardPool, ScoreResult

__all__ = [
    "CompositeReward",
    "RewardDataError",
    "RewardError",
    "RewardFn",
    "RewardPool",
    "RewardPoolError",
    "RewardSpec",
    "RewardSpecError",
    "ScoreResult",
    "batched",
    "load_reward",
    "parse_reward_specs",
]
