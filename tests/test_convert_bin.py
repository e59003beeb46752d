"""BitMamba-2 engine `.bin`: reader/writer, bit-exact import/export, numerics against the real engine.

Fixture: tests/fixtures/bitmamba2/ (tiny.bin + the published C++ engine's logits and greedy tokens).
"""

import struct

import numpy as np
import pytest
import torch

from conftest import FIXTURES
from model.binfile import (MAGIC, BinHeader, BinModel, FpRecord, TernaryRecord, bin_layout, encode_bin,
                           pack_codes, read_bin, unpack_codes, write_bin)
from model.convert import latent_from_ternary, ternary_scale
from model.errors import CheckpointError

FIX = FIXTURES / "bitmamba2"
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]


def random_bin(vocab=64, d_model=16, n_layers=2, n_heads=2, seed=0) -> BinModel:
    """A random, valid BinModel (codes ~1/3 zeros, scales ~ 1/mean|W| of a random latent)."""
    rng = np.random.default_rng(seed)
    h = BinHeader(vocab=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads)
    recs = []
    for name, rtype, shape in bin_layout(h):
        if rtype == 0:
            recs.append(FpRecord(name, rng.standard_normal(shape).astype(np.float32)))
        else:
            w = rng.standard_normal(shape).astype(np.float32) * 0.3
            s = ternary_scale(w)
            codes = np.clip(np.sign(w) * np.floor(np.abs(w * s) + 0.5), -1, 1).astype(np.int8)
            recs.append(TernaryRecord(name, codes, s))
    return BinModel(h, recs)


# ---------------------------------------------------------------------------------------------
# packing and the file format


def test_pack_layout_matches_spec():
    codes = np.array([[-1, 0, 1, 1, 0, 0, -1, 1]], dtype=np.int8)
    packed = pack_codes(codes)
    # codes+1 = 0,1,2,2 -> 0 | 1<<2 | 2<<4 | 2<<6 = 0b10100100 ; 1,1,0,2 -> 1 | 1<<2 | 0 | 2<<6
    assert packed.tolist() == [[0b10100100, 0b10000101]]
    assert (unpack_codes(packed, 8).astype(np.int8) - 1 == codes).all()


def test_pack_matches_model_core_pack_ternary():
    from model import bitlinear

    codes = np.random.default_rng(0).integers(-1, 2, size=(7, 24)).astype(np.int8)
    assert (bitlinear.pack_ternary(torch.from_numpy(codes)).numpy() == pack_codes(codes)).all()


def test_read_fixture_header_and_records():
    m = read_bin(FIX / "tiny.bin")
    assert (m.header.vocab, m.header.d_model, m.header.n_layers, m.header.n_heads) == (512, 64, 2, 2)
    assert m.names()[:3] == ["embedding.weight", "layers.0.mixer.in_proj.norm.weight",
                             "layers.0.mixer.in_proj.weight"]
    assert m.names()[-1] == "lm_head.weight" and len(m.records) == 1 + 9 * 2 + 3
    ip = m["layers.0.mixer.in_proj.weight"]
    assert ip.codes.shape == (262, 64) and ip.codes.dtype == np.int8
    assert set(np.unique(ip.codes)) <= {-1, 0, 1}
    assert m["layers.1.mixer.conv1d.weight"].data.shape == (128, 1, 4)


def test_fixture_write_is_byte_identical(tmp_path):
    raw = (FIX / "tiny.bin").read_bytes()
    write_bin(tmp_path / "copy.bin", read_bin(FIX / "tiny.bin"))
    assert (tmp_path / "copy.bin").read_bytes() == raw


def test_random_bin_roundtrip(tmp_path):
    m = random_bin()
    write_bin(tmp_path / "a.bin", m)
    m2 = read_bin(tmp_path / "a.bin")
    assert m2.header == m.header and m2.names() == m.names()
    for r, r2 in zip(m.records, m2.records):
        if isinstance(r, FpRecord):
            assert np.array_equal(r.data, r2.data)
        else:
            assert np.array_equal(r.codes, r2.codes) and r.scale == r2.scale
    assert encode_bin(m2) == (tmp_path / "a.bin").read_bytes()


# ---------------------------------------------------------------------------------------------
# bad files


def _write(tmp_path, data: bytes):
    p = tmp_path / "bad.bin"
    p.write_bytes(data)
    return p


def test_wrong_magic(tmp_path):
    data = bytearray(encode_bin(random_bin()))
    data[:4] = struct.pack("<i", 0x12345678)
    with pytest.raises(CheckpointError, match=r"bad\.bin: bad magic 0x12345678"):
        read_bin(_write(tmp_path, bytes(data)))


def test_truncated_names_record_and_offset(tmp_path):
    data = encode_bin(random_bin())
    with pytest.raises(CheckpointError, match=r"bad\.bin: truncated in record 21 \(lm_head\.weight\)"):
        read_bin(_write(tmp_path, data[:-3]))
    with pytest.raises(CheckpointError, match=r"truncated in record 0 \(embedding\.weight\) starting at offset 20"):
        read_bin(_write(tmp_path, data[:100]))
    with pytest.raises(CheckpointError, match=r"truncated header"):
        read_bin(_write(tmp_path, data[:10]))


def test_trailing_bytes(tmp_path):
    data = encode_bin(random_bin())
    with pytest.raises(CheckpointError, match=rf"bad\.bin: 5 trailing bytes after the last record \(offset {len(data)}"):
        read_bin(_write(tmp_path, data + b"\0" * 5))


def test_wrong_record_type_and_shape(tmp_path):
    m = random_bin()
    data = bytearray(encode_bin(m))
    # the first in_proj record starts after header + embedding + in_proj.norm
    off = 20 + (16 + 64 * 16 * 4) + (12 + 16 * 4)
    assert struct.unpack_from("<i", data, off)[0] == 2
    struct.pack_into("<i", data, off, 0)
    with pytest.raises(CheckpointError, match=r"record 2 \(layers\.0\.mixer\.in_proj\.weight\).*expected a ternary.*found type 0"):
        read_bin(_write(tmp_path, bytes(data)))
    struct.pack_into("<i", data, off, 2)
    struct.pack_into("<i", data, off + 8, 20)  # cols 16 -> 20
    with pytest.raises(CheckpointError, match=r"in_proj\.weight.*expected ternary shape \[70, 16\], found \[70, 20\]"):
        read_bin(_write(tmp_path, bytes(data)))


def test_invalid_code_3(tmp_path):
    data = bytearray(encode_bin(random_bin()))
    data[-1] = 0xFF  # last byte of lm_head codes: four code-3 entries
    with pytest.raises(CheckpointError, match=r"lm_head\.weight.*invalid 2-bit code 3"):
        read_bin(_write(tmp_path, bytes(data)))


def test_corrupt_header_huge_n_layers_fails_fast(tmp_path):
    data = encode_bin(random_bin())
    bad = bytearray(data)
    struct.pack_into("<i", bad, 12, 2**30)  # n_layers
    with pytest.raises(CheckpointError, match=r"bad\.bin: record 20 \(layers\.2\.mixer\.in_proj\.weight\).*found type 0"):
        read_bin(_write(tmp_path, bytes(bad)))


def test_header_d_model_not_multiple_of_4(tmp_path):
    data = struct.pack("<5i", MAGIC, 64, 18, 1, 2)
    with pytest.raises(CheckpointError, match=r"bad\.bin: d_model = 18 is not a multiple of 4"):
        read_bin(_write(tmp_path, data))


def test_writer_rejects_bad_record_and_writes_nothing(tmp_path):
    m = random_bin()
    m.records[2] = TernaryRecord(m.records[2].name, np.zeros((70, 12), np.int8), np.float32(1.0))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mixer\.in_proj\.weight: expected ternary \[70, 16\]"):
        write_bin(tmp_path / "out.bin", m)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# latent weights that reproduce stored codes and scales bit-exactly


@pytest.mark.parametrize("n,nnz,scale", [
    (262 * 64, 11000, 4.182349),
    (1077, 639, 1.6704385),  # no single magnitude hits this scale: two adjacent magnitudes needed
    (1 << 20, 700_001, 2.7182817),
    (3369, 1722, 3.8886359),
    (64, 1, 0.02),
])
def test_latent_reproduces_codes_and_scale(n, nnz, scale):
    from model.bitlinear import weight_quant

    rng = np.random.default_rng(n)
    codes = np.zeros(n, np.int8)
    codes[rng.choice(n, nnz, replace=False)] = rng.choice([-1, 1], nnz)
    codes = codes.reshape(1, n)
    scale = np.float32(scale)
    w = latent_from_ternary(codes, scale, "w")
    assert ternary_scale(w) == scale
    assert np.array_equal(w == 0, codes == 0)
    q, s = weight_quant(torch.from_numpy(w), None)
    assert np.array_equal(q.numpy().astype(np.int8), codes)
    assert abs(float(s) / float(scale) - 1) < 1e-5  # the model's own fp32 recomputation


def test_latent_all_zero_codes():
    w = latent_from_ternary(np.zeros((4, 8), np.int8), np.float32(1e5), "z")
    assert not w.any() and ternary_scale(w) == np.float32(1e5)


# ---------------------------------------------------------------------------------------------
# numerics against the real engine


def engine_reference_logits(m: BinModel, ids: list[int]) -> np.ndarray:
    """Independent float64 token-by-token re-implementation of the engine (ANCHORS §1) -> [T, V]."""
    h = m.header
    di, H, P = h.d_inner, h.n_heads, h.head_dim

    def rha(x):
        return np.sign(x) * np.floor(np.abs(x) + 0.5)

    def bitlinear(x, name):
        rec = m[name]
        x = x / np.sqrt(np.mean(x * x) + 1e-6) * m[name[: -len("weight")] + "norm.weight"].data
        sx = 127 / (np.abs(x).max() + 1e-5)
        return (rec.codes.astype(np.float64) @ np.clip(rha(x * sx), -128, 127)) / (sx * np.float64(rec.scale))

    conv = [np.zeros((di, 3)) for _ in range(h.n_layers)]
    ssm = [np.zeros((H, P)) for _ in range(h.n_layers)]
    out = []
    for t in ids:
        x = m["embedding.weight"].data[t].astype(np.float64)
        for i in range(h.n_layers):
            p = f"layers.{i}.mixer."
            z, xs, B, C, dt = np.split(bitlinear(x, p + "in_proj.weight"), [di, 2 * di, 2 * di + H, 2 * di + 2 * H])
            win = np.concatenate([conv[i], xs[:, None]], 1)
            conv[i] = win[:, 1:]
            xc = (win * m[p + "conv1d.weight"].data[:, 0, :]).sum(1) + m[p + "conv1d.bias"].data
            xc = xc / (1 + np.exp(-xc))
            dt = np.log1p(np.exp(dt + m[p + "dt_bias"].data))
            A = -np.exp(m[p + "A_log"].data.astype(np.float64))
            ssm[i] = np.exp(A * dt)[:, None] * ssm[i] + xc.reshape(H, P) * (B * dt)[:, None]
            y = (ssm[i] * C[:, None]).reshape(-1) + m[p + "D"].data * xc
            x = x + bitlinear(y * z / (1 + np.exp(-z)), p + "out_proj.weight")
        x = x / np.sqrt(np.mean(x * x) + 1e-6) * m["norm_f.weight"].data
        out.append(bitlinear(x, "lm_head.weight"))
    return np.array(out)


def engine_logits() -> np.ndarray:
    return np.fromfile(FIX / "engine_prompt_logits.f32", dtype="<f4").reshape(len(PROMPT), 512)


def engine_greedy() -> list[int]:
    return [int(t) for t in (FIX / "engine_greedy_32.txt").read_text().split()]


def test_reader_matches_engine_via_float64_reference():
    """Checks the reader (names, order, code/scale semantics) independently of our model code."""
    ref = engine_reference_logits(read_bin(FIX / "tiny.bin"), PROMPT)
    assert np.abs(ref - engine_logits()).max() < 2e-5


@pytest.fixture(scope="module")
def imported():
    from model.convert import import_bin

    return import_bin(FIX / "tiny.bin")


def test_import_config_is_bitmamba2_layout(imported):
    c = imported.config
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.headdim) == (512, 64, 2, 2, 64)
    assert (c.ngroups, c.d_state, c.conv_bc, c.d_per_channel, c.gated_norm) == (2, 1, False, True, False)
    assert (c.bitlinear_norm, c.block_prenorm, c.ternary_head, c.norm_eps) == (True, False, True, 1e-6)


def test_imported_model_matches_engine_logits(imported):
    with torch.no_grad():
        logits = imported(torch.tensor([PROMPT])).logits[0].float().numpy()
    diff = np.abs(logits - engine_logits()).max()
    print(f"max |ours - engine| = {diff:.3e} (max |logit| {np.abs(engine_logits()).max():.1f})")
    assert diff < 1e-3


def test_imported_model_greedy_matches_engine(imported):
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(32):
            ids.append(int(imported(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ids[len(PROMPT):] == engine_greedy()


def test_import_export_byte_identical_fixture(imported, tmp_path):
    from model.convert import export_bin

    export_bin(imported, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == (FIX / "tiny.bin").read_bytes()


def test_import_export_byte_identical_random(tmp_path):
    from model.convert import export_bin, import_bin

    for seed, shape in enumerate([(64, 16, 2, 2), (96, 32, 3, 4)]):
        write_bin(tmp_path / "src.bin", random_bin(*shape, seed=seed))
        export_bin(import_bin(tmp_path / "src.bin"), tmp_path / "out.bin")
        assert (tmp_path / "out.bin").read_bytes() == (tmp_path / "src.bin").read_bytes()


def test_export_of_trained_model_roundtrips(tmp_path):
    """A model whose latents are not of the import form: export -> import -> export is stable."""
    from model.config import BitMambaConfig
    from model.convert import bitmamba2_config, export_bin, import_bin
    from model.lm import BitMambaLM

    cfg = bitmamba2_config(BinHeader(vocab=64, d_model=16, n_layers=2, n_heads=2))
    assert isinstance(cfg, BitMambaConfig)
    model = BitMambaLM(cfg).eval()
    export_bin(model, tmp_path / "a.bin")
    back = import_bin(tmp_path / "a.bin")
    export_bin(back, tmp_path / "b.bin")
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        ya, yb = model(ids).logits, back(ids).logits
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4)


def test_imported_model_recurrent_step_matches_engine(imported):
    """The one-token `step` path (what the rollout engine runs) also reproduces the engine."""
    with torch.no_grad():
        state = imported.allocate_state(1)
        logits = np.stack([imported.step(torch.tensor([t]), state)[0].numpy() for t in PROMPT])
        assert np.abs(logits - engine_logits()).max() < 1e-3
        out, nxt = [], int(logits[-1].argmax())
        for _ in range(32):
            out.append(nxt)
            nxt = int(imported.step(torch.tensor([nxt]), state)[0].argmax())
    assert out == engine_greedy()
