"""`python -m rl.grpo --config FILE [...]`: the GRPO driver (`rl.grpo.driver.main`), as `bitmamba grpo`."""

import sys

from rl.args import run_main
from rl.grpo.driver import main

sys.exit(run_main(main, sys.argv[1:]))
