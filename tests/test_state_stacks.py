"""Stacked Mamba state: `allocate_state` makes every Mamba layer's conv/SSM tensor a view of two stacked
buffers, and the row operations (select, write_rows, copy/reset rows, the engine's RowSnapshot) act on
the stacks (one launch per buffer) with the same results as the per-layer path they replace."""

import pytest
import torch

from model.config import BitMambaConfig
from model.lm import BitMambaLM
from model.state import ModelState
from rollout.backends import TorchBackend, make_backend
from rollout.backends.base import RowSnapshot, write_rows


def _rand_state(model, B, max_len=32):
    st = model.allocate_state(B, max_len)
    g = torch.Generator().manual_seed(0)
    for layer in st.layers:
        for t in vars(layer).values():
            t.copy_(torch.randn(t.shape, generator=g))
    st.pos.copy_(torch.arange(B) + 3)
    return st


def _unstacked(st):
    """The same numbers with independent per-layer tensors (the per-layer path)."""
    layers = [type(layer)(**{k: v.clone() for k, v in vars(layer).items()}) for layer in st.layers]
    return ModelState(layers=layers, pos=st.pos.clone())


def _same(a, b):
    assert a.batch_size == b.batch_size and torch.equal(a.pos, b.pos)
    for la, lb in zip(a.layers, b.layers):
        for k in vars(la):
            assert torch.equal(getattr(la, k), getattr(lb, k)), k


@pytest.fixture(params=["tiny", "tiny-hybrid", "tiny-bitmamba2"])
def model(request):
    torch.manual_seed(0)
    return BitMambaLM(BitMambaConfig.preset(request.param)).eval()


def test_allocate_state_makes_mamba_layers_views_of_two_stacks(model):
    st = model.allocate_state(3, 16, dtype=torch.bfloat16, ssm_dtype=torch.float32)
    conv, ssm = st.stacks()
    idx = st.mamba_layers()
    assert conv.shape[:2] == (len(idx), 3) and conv.dtype == torch.bfloat16 and ssm.dtype == torch.float32
    st.layers[idx[-1]].ssm.fill_(2.0)              # writing a layer writes its slice of the stack
    assert float(ssm[-1].min()) == 2.0 and float(ssm[0].abs().max()) == 0.0
    if len(idx) > 1:                               # views of the stack in the wrong order break it too
        a, b = st.layers[idx[0]], st.layers[idx[1]]
        a.conv, b.conv = b.conv, a.conv
        assert st.stacks() is None
        a.conv, b.conv = b.conv, a.conv
        assert st.stacks() is not None
    st.layers[idx[0]].ssm = st.layers[idx[0]].ssm.clone()   # a reassigned tensor breaks the link
    assert st.stacks() is None


def test_row_operations_on_stacks_equal_the_per_layer_path(model):
    st = _rand_state(model, 5)
    ref = _unstacked(st)
    assert st.stacks() is not None and ref.stacks() is None
    rows = torch.tensor([4, 1, 1])
    sel = st.select(rows)
    assert sel.stacks() is not None
    _same(sel, ref.select(rows))
    for dst, src_rows in ((torch.tensor([0, 2, 3]), rows), (torch.tensor([1, 4]), torch.tensor([2]))):
        a, b = st.select(torch.arange(5)), ref.select(torch.arange(5))     # stacked / per-layer copies
        write_rows(a, dst, st.select(src_rows))
        write_rows(b, dst, ref.select(src_rows))
        _same(a, b)
    a, b = st.select(torch.arange(5)), ref.select(torch.arange(5))
    assert a.stacks() is not None and b.stacks() is None
    a.copy_rows_(torch.tensor([0, 1]), torch.tensor([3, 4]))
    b.copy_rows_(torch.tensor([0, 1]), torch.tensor([3, 4]))
    _same(a, b)
    a.reset_rows_(torch.tensor([2, 0]))
    b.reset_rows_(torch.tensor([2, 0]))
    _same(a, b)


def test_row_snapshot_on_stacks_equals_the_per_layer_snapshot(model):
    live = _rand_state(model, 4)
    ref = _unstacked(live)
    sa, sb = RowSnapshot(live), RowSnapshot(ref)
    assert sa.stacks is not None and sb.stacks is None
    sa.take()
    sb.take()
    for st in (live, ref):                  # the slots move on past the snapshot
        for layer in st.layers:
            for t in vars(layer).values():
                t.add_(1.0)
        st.pos += 2
    rows = torch.tensor([3, 0])
    _same(sa.rows(rows), sb.rows(rows))
    assert sa.rows(rows).stacks() is not None
    sa.restore(rows)
    sb.restore(rows)
    _same(live, ref)
    assert int(live.pos[3]) == 6 and int(live.pos[1]) == 6     # restored 3 + 3; row 1 moved on (4 + 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_slot_states_are_stacked(model, dtype):
    for kind in ("torch", "fast"):
        be = make_backend(model, kind, state_dtype=dtype)
        be.allocate(4, 32)
        conv, ssm = be.state.stacks()
        assert ssm.dtype == (dtype if isinstance(be, TorchBackend) else be.ssm_dtype)
        _, st1 = be.prefill(torch.tensor([1, 2, 3]))
        be.load_rows(st1, torch.tensor([0, 2]))
        assert be.state.stacks() is not None                 # loads write through the views
        assert int(be.state.pos[2]) == 3
