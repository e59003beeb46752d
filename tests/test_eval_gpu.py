"""The lm-eval adapter on CUDA (mamba-ssm's Triton SSD scan with seq_idx for left padding)."""

import pytest
import torch

from model.config import BitMambaConfig
from model.lm import BitMambaLM
from rl.eval.lm import LogLikelihoodScorer

pytestmark = pytest.mark.gpu


def _pairs(V: int, n_ctx: int = 9, n_cont: int = 4):
    g = torch.Generator().manual_seed(1)
    pairs = []
    for _ in range(n_ctx):
        ctx = torch.randint(1, V, (int(torch.randint(1, 300, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n_cont):
            pairs.append((ctx, torch.randint(1, V, (int(torch.randint(1, 8, (1,), generator=g)),),
                                             generator=g).tolist()))
    return pairs


@pytest.mark.parametrize("preset", ["tiny-bitmamba2", "tiny", "tiny-hybrid"])
def test_cuda_reuse_matches_full_forward_fp32(preset):
    torch.manual_seed(0)
    model = BitMambaLM(BitMambaConfig.preset(preset)).cuda().eval()
    pairs = _pairs(model.config.vocab_size)
    a = LogLikelihoodScorer(model, batch_size=4, max_length=64).loglikelihood(pairs, reuse_prefix=True)
    b = LogLikelihoodScorer(model, batch_size=4, max_length=64).loglikelihood(pairs, reuse_prefix=False)
    # Different chunkings of the Triton scan move activations by ~1e-6, which can flip an int8
    # activation rounding somewhere: small discrete differences (seen: up to ~0.012 nats on ~30).
    # A wrong state (padding leaking in, a row mixed up) costs whole nats.
    diffs = torch.tensor([abs(la - lb) for (la, _), (lb, _) in zip(a, b)])
    assert float(diffs.max()) < 0.1 and float(diffs.median()) < 0.01, diffs


def test_cuda_tf32_equals_fp32_and_bf16_is_close():
    torch.manual_seed(0)
    model = BitMambaLM(BitMambaConfig.preset("tiny-bitmamba2")).cuda().eval()
    pairs = _pairs(model.config.vocab_size, n_ctx=4)
    a = LogLikelihoodScorer(model, batch_size=4).loglikelihood(pairs)
    b = LogLikelihoodScorer(model, batch_size=4, autocast_dtype=torch.bfloat16).loglikelihood(pairs)
    c = LogLikelihoodScorer(model, batch_size=4, tf32=True).loglikelihood(pairs)
    for (la, _), (lb, _), (_, cont) in zip(a, b, pairs):
        assert lb == pytest.approx(la, abs=0.1 * len(cont))
    # int8 x ternary is exact in TF32 (seen: 0.0 difference on the 1B shape); allow a rare rounding flip
    tf32_diffs = torch.tensor([abs(la - lc) for (la, _), (lc, _) in zip(a, c)])
    assert float(tf32_diffs.median()) < 1e-4 and float(tf32_diffs.max()) < 0.05, tf32_diffs
    assert not torch.backends.cuda.matmul.allow_tf32    # the global flag is restored
