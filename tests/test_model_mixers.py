"""Mixers: step == forward, stateful split == one call, seq_idx packing == separate sequences,
per-row positions in the KV cache, and ModelState row operations."""

import pytest
import torch
import torch.nn.functional as F

from model.attention import Attention, doc_positions
from model.config import BitMambaConfig, QuantConfig
from model.mamba2 import Mamba2Mixer, causal_conv
from model.state import MambaState, ModelState

FP = QuantConfig(ternary=False)  # float projections: exposes tiny scan/recurrence differences
LAYOUTS = {
    "standard": BitMambaConfig.preset("tiny", quant=FP),
    "bitmamba2": BitMambaConfig.preset("tiny-bitmamba2", quant=FP),
    "standard-ternary": BitMambaConfig.preset("tiny"),
    "bitmamba2-ternary": BitMambaConfig.preset("tiny-bitmamba2"),
    "grouped-w158a16": BitMambaConfig.preset("tiny", quant=QuantConfig(weight_scale="group", group_size=16,
                                                                        activation="none")),
}
ATTN = BitMambaConfig.preset("tiny-hybrid", quant=FP)


def mixer(cfg, idx=0):
    m = Mamba2Mixer(cfg, idx).eval()
    with torch.no_grad():  # non-trivial D and conv so every path matters
        m.D.uniform_(0.5, 1.5)
    return m


def attn():
    return Attention(ATTN, 1).eval()


def test_causal_conv_matches_conv1d_and_seq_idx():
    x = torch.randn(2, 9, 6)
    w, b = torch.randn(6, 1, 4), torch.randn(6)
    out, hist = causal_conv(x, w, b, None, None)
    ref = F.conv1d(x.transpose(1, 2), w, b, padding=3, groups=6)[..., :9].transpose(1, 2)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(hist, x[:, -3:].transpose(1, 2))
    seq = torch.tensor([[0] * 4 + [1] * 5, [0] * 9], dtype=torch.int32)
    out_s, hist_s = causal_conv(x, w, b, None, seq)
    first, _ = causal_conv(x[:1, :4], w, b, None, None)
    second, _ = causal_conv(x[:1, 4:], w, b, None, None)
    torch.testing.assert_close(out_s[:1], torch.cat([first, second], 1))
    torch.testing.assert_close(out_s[1:], out[1:])
    # history keeps only the last document's inputs
    seq2 = torch.tensor([[0] * 8 + [1]], dtype=torch.int32)
    _, h2 = causal_conv(x[:1], w, b, None, seq2)
    assert (h2[0, :, :2] == 0).all() and torch.equal(h2[0, :, 2], x[0, -1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mamba_step_matches_forward(layout):
    cfg = LAYOUTS[layout]
    m = mixer(cfg)
    u = torch.randn(2, 19, cfg.d_model)
    with torch.no_grad():
        ref = m(u)
        st = m.allocate_state(2)
        steps = torch.stack([m.step(u[:, t], st) for t in range(19)], 1)
        st2 = m.allocate_state(2)
        m(u, state=st2)
    tol = 1e-5 if not cfg.quant.ternary else 1e-4
    torch.testing.assert_close(steps, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(st.ssm, st2.ssm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.conv, st2.conv)


@pytest.mark.parametrize("layout", ["standard", "bitmamba2"])
@pytest.mark.parametrize("splits", [[7, 12], [1, 1, 2, 15], [2, 17], [18, 1]])
def test_mamba_split_forward_with_state_equals_one_call(layout, splits):
    cfg = LAYOUTS[layout]
    m = mixer(cfg)
    u = torch.randn(2, 19, cfg.d_model)
    with torch.no_grad():
        ref = m(u)
        st = m.allocate_state(2)
        outs, t0 = [], 0
        for n in splits:  # includes T=1 and T < d_conv - 1
            outs.append(m(u[:, t0:t0 + n], state=st))
            t0 += n
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["standard", "bitmamba2"])
def test_mamba_packed_equals_separate(layout):
    cfg = LAYOUTS[layout]
    m = mixer(cfg)
    u = torch.randn(1, 23, cfg.d_model)
    seq = torch.tensor([[0] * 10 + [1] * 2 + [2] * 11], dtype=torch.int32)
    relabeled = torch.tensor([[7] * 10 + [3] * 2 + [7] * 11], dtype=torch.int32)  # ids need not be 0.. or unique
    with torch.no_grad():
        packed = m(u, seq_idx=seq)
        torch.testing.assert_close(m(u, seq_idx=relabeled), packed)
        sep = torch.cat([m(u[:, :10]), m(u[:, 10:12]), m(u[:, 12:])], 1)
        # stateful packed forward leaves the state of the last document
        st = m.allocate_state(1)
        m(u, seq_idx=seq, state=st)
        st_last = m.allocate_state(1)
        m(u[:, 12:], state=st_last)
    torch.testing.assert_close(packed, sep, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.ssm, st_last.ssm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.conv, st_last.conv)


def test_mamba_gradients_with_seq_idx_finite():
    cfg = LAYOUTS["standard-ternary"]
    m = Mamba2Mixer(cfg).train()
    u = torch.randn(2, 21, cfg.d_model, requires_grad=True)
    seq = torch.tensor([[0] * 5 + [1] * 16, [0] * 20 + [1]], dtype=torch.int32)
    m(u, seq_idx=seq).square().mean().backward()
    for name, p in list(m.named_parameters()) + [("u", u)]:
        g = p.grad if name != "u" else u.grad
        assert g is not None and torch.isfinite(g).all(), name
    assert m.A_log.grad.abs().sum() > 0 and m.dt_bias.grad.abs().sum() > 0


def test_attention_step_matches_forward():
    a = attn()
    x = torch.randn(2, 11, ATTN.d_model)
    with torch.no_grad():
        ref = a(x)
        st = a.allocate_state(2, 16)
        pos = torch.zeros(2, dtype=torch.long)
        outs = []
        for t in range(11):
            outs.append(a.step(x[:, t], st, pos))
            pos += 1
        st2 = a.allocate_state(2, 16)
        first = a(x[:, :4], state=st2, pos=torch.zeros(2, dtype=torch.long))
        second = a(x[:, 4:], state=st2, pos=torch.full((2,), 4))
    torch.testing.assert_close(torch.stack(outs, 1), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([first, second], 1), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.k, st2.k)


def test_attention_rows_at_different_positions():
    a = attn()
    x0, x1 = torch.randn(1, 6, ATTN.d_model), torch.randn(1, 3, ATTN.d_model)
    nxt = torch.randn(2, ATTN.d_model)
    with torch.no_grad():
        ref0 = a(torch.cat([x0, nxt[None, :1]], 1))[:, -1]
        ref1 = a(torch.cat([x1, nxt[None, 1:]], 1))[:, -1]
        st = a.allocate_state(2, 8)
        a(x0, state=AttnRow(st, 0), pos=torch.tensor([0]))
        a(x1, state=AttnRow(st, 1), pos=torch.tensor([0]))
        out = a.step(nxt, st, torch.tensor([6, 3]))
    torch.testing.assert_close(out[0], ref0[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], ref1[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        with torch.no_grad():
            a.step(nxt, st, torch.tensor([8, 3]))


class AttnRow:
    """View of one row of an AttnState (writes go through to the parent)."""

    def __init__(self, st, row):
        self.k = st.k[row:row + 1]
        self.v = st.v[row:row + 1]


def test_attention_packed_equals_separate():
    a = attn()
    x = torch.randn(1, 13, ATTN.d_model)
    seq = torch.tensor([[0] * 5 + [1] * 8], dtype=torch.int32)
    assert doc_positions(seq).tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7]]
    with torch.no_grad():
        packed = a(x, seq_idx=seq)
        sep = torch.cat([a(x[:, :5]), a(x[:, 5:])], 1)
    torch.testing.assert_close(packed, sep, rtol=1e-5, atol=1e-5)
    # gradients flow through the per-document kernels like through separate calls
    a.train()
    gy = torch.randn(1, 13, ATTN.d_model)
    g_packed = torch.autograd.grad((a(x, seq_idx=seq) * gy).sum(), a.k_proj.weight)[0]
    g_sep = torch.autograd.grad((torch.cat([a(x[:, :5]), a(x[:, 5:])], 1) * gy).sum(), a.k_proj.weight)[0]
    torch.testing.assert_close(g_packed, g_sep, rtol=1e-5, atol=1e-6)
    assert g_packed.abs().sum() > 0


def test_model_state_row_ops():
    st = ModelState(layers=[MambaState(conv=torch.randn(3, 4, 3), ssm=torch.randn(3, 2, 2, 2))],
                    pos=torch.tensor([5, 7, 9]))
    sel = st.select(torch.tensor([2, 0]))
    assert torch.equal(sel.layers[0].ssm, st.layers[0].ssm[[2, 0]]) and sel.pos.tolist() == [9, 5]
    sel.layers[0].ssm.zero_()
    assert st.layers[0].ssm.abs().sum() > 0  # select copies
    st.copy_rows_(torch.tensor([0]), torch.tensor([2]))
    assert torch.equal(st.layers[0].conv[2], st.layers[0].conv[0]) and st.pos.tolist() == [5, 7, 5]
    st.reset_rows_(torch.tensor([1]))
    assert st.layers[0].ssm[1].abs().sum() == 0 and st.pos.tolist() == [5, 0, 5]
    assert st.layers[0].ssm[0].abs().sum() > 0
    with pytest.raises(ValueError):
        st.copy_rows_(torch.tensor([0, 1]), torch.tensor([2]))
