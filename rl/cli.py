"""`bitmamba` command line: one sub-command per stage.

Each sub-command lives in its own module as `main(argv: list[str]) -> int`; this file only routes.
Errors caused by the user (`BitMambaError`) print one line, no traceback, unless BITMAMBA_DEBUG=1.
Commands whose module loads torch / DeepSpeed have their parser in `rl.args` (torch-free): the router
parses with it first, so `--help` and argument errors answer before the heavy imports.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from rl.args import PARSERS, run_main


def _convert(argv): from model.convert import main; return main(argv)  # noqa: E702
def _info(argv): from model.info import main; return main(argv)  # noqa: E702
def _generate(argv): from rollout.cli import main; return main(argv)  # noqa: E702
def _pretrain(argv): from rl.train.pretrain import main; return main(argv)  # noqa: E702
def _sft(argv): from rl.train.sft import main; return main(argv)  # noqa: E702
def _distill(argv): from rl.train.distill import main; return main(argv)  # noqa: E702
def _grpo(argv): from rl.grpo.driver import main; return main(argv)  # noqa: E702
def _tool_warmstart(argv): from rl.grpo.tool_warmstart import main; return main(argv)  # noqa: E702
def _demo(argv): from rl.demo import main; return main(argv)  # noqa: E702
def _eval(argv): from rl.eval.run import main; return main(argv)  # noqa: E702
def _reward_check(argv): from rewards.check import main; return main(argv)  # noqa: E702


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "demo": (_demo, "the embedded default: tiny model warm start + GRPO on CPU with local Ray"),
    "convert": (_convert, "convert checkpoints (hf-mamba2, bitmamba2-bin) to and from ours"),
    "info": (_info, "print a checkpoint's config, parameter counts and packed size"),
    "generate": (_generate, "sample completions from a checkpoint"),
    "pretrain": (_pretrain, "pretraining stage"),
    "sft": (_sft, "supervised fine-tuning stage"),
    "distill": (_distill, "ternary distillation from a full-precision Mamba-2"),
    "grpo": (_grpo, "GRPO reinforcement learning on Ray"),
    "tool-warmstart": (_tool_warmstart, "supervised tool-call demonstrations: the --init of GRPO with tools"),
    "eval": (_eval, "zero-shot benchmarks through lm-eval (--tasks/--task-file) and pass@k generation evals (--gen)"),
    "reward-check": (_reward_check, "run a reward function over a small dataset and summarize"),
}


def _usage() -> str:
    lines = ["usage: bitmamba COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name in PARSERS:
        PARSERS[name]().parse_args(rest)     # --help / a bad argument exits here, before torch loads
    return run_main(COMMANDS[name][0], rest)


if __name__ == "__main__":
    sys.exit(main())
