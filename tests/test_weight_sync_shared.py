"""Weight sync through one flat buffer (the CUDA IPC path's layout) and the choice of path per worker."""

import multiprocessing as mp

import pytest
import torch

from model.config import BitMambaConfig
from model.lm import BitMambaLM
from rl.grpo.weight_sync import (PolicyWeights, collect_policy, export_policy, flatten_policy, load_into, plan_sync,
                            policy_views)


def _model(seed: int, **over) -> BitMambaLM:
    torch.manual_seed(seed)
    return BitMambaLM(BitMambaConfig.preset("tiny-bitmamba2", **over)).eval()


def test_flat_buffer_round_trip_loads_the_same_weights_as_the_object_store_path():
    src, a, b = _model(0), _model(1), _model(1)
    w = collect_policy(src, version=4)
    # odd sizes, a 0-dim tensor, ints and bools sit in the same buffer
    w.dense["extra.scalar"] = torch.tensor(3.5)
    w.dense["extra.flags"] = torch.tensor([True, False, True])
    w.dense["extra.ids"] = torch.arange(7, dtype=torch.int64)
    buf, packed, dense = flatten_policy(w, torch.device("cpu"))
    assert buf.dtype == torch.uint8 and all(e[0] % 16 == 0 for e in dense.values())
    v = policy_views(4, buf, packed, dense)
    assert set(v.packed) == set(w.packed) and set(v.dense) == set(w.dense)
    for k, (c, s) in w.packed.items():
        assert torch.equal(v.packed[k][0], c) and torch.equal(v.packed[k][1], s)
    for k, t in w.dense.items():
        assert v.dense[k].dtype == t.dtype and torch.equal(v.dense[k], t)
    for k in ("extra.scalar", "extra.flags", "extra.ids"):
        del v.dense[k]
    load_into(a, v)
    load_into(b, export_policy(src, version=4))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.randint(0, a.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.allclose(a(ids).logits, src(ids).logits, atol=1e-5)   # latent scale: fp32 rounding


def test_views_alias_the_buffer():
    w = PolicyWeights(version=0, dense={"x": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
    buf, packed, dense = flatten_policy(w, torch.device("cpu"))
    v = policy_views(0, buf, packed, dense)
    buf.zero_()
    assert torch.equal(v.dense["x"], torch.zeros(2, 3))


def test_plan_sync_uses_ipc_only_for_workers_on_the_learner_gpu():
    assert plan_sync("auto", "GPU-a", ["GPU-a", "GPU-b", None]) == [True, False, False]
    assert plan_sync("object_store", "GPU-a", ["GPU-a"]) == [False]
    assert plan_sync("auto", None, [None, None]) == [False, False]


def _child(q, sp, ref_sd):
    import torch

    from model.config import BitMambaConfig
    from model.lm import BitMambaLM
    from rl.grpo.weight_sync import load_into, open_shared

    torch.manual_seed(1)
    m = BitMambaLM(BitMambaConfig.preset("tiny-bitmamba2")).cuda().eval()
    load_into(m, open_shared(sp))
    sd = m.state_dict()
    q.put(all(torch.equal(sd[k].cpu(), ref_sd[k]) for k in sd))


@pytest.mark.gpu
def test_cuda_ipc_export_loads_in_another_process_on_the_same_gpu():
    from rl.grpo.weight_sync import export_shared

    src = _model(0).cuda()
    ref = _model(1).cuda()
    load_into(ref, export_policy(src, version=2))
    ref_sd = {k: t.cpu() for k, t in ref.state_dict().items()}
    sp, buf = export_shared(src, version=2)
    assert sp.nbytes == buf.numel() and sp.version == 2
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, sp, ref_sd))
    p.start()
    ok = q.get(timeout=300)
    p.join(60)
    assert ok and p.exitcode == 0
