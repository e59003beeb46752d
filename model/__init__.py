"""BitMamba model core: config, BitLinear, Mamba-2 / attention mixers, LM, checkpoints.

Public names are imported lazily (`from model import BitMambaLM` works) so that light users such as
`model.errors` and `model.typed` do not pull in torch.
"""

from importlib import import_module

_EXPORTS = {
    "BitMambaConfig": "model.config", "QuantConfig": "model.config",
    "BitLinear": "model.bitlinear", "PackedTernary": "model.bitlinear",
    "pack_ternary": "model.bitlinear", "unpack_ternary": "model.bitlinear",
    "BitMambaLM": "model.lm", "LMOutput": "model.lm",
    "ModelState": "model.state", "MambaState": "model.state", "AttnState": "model.state",
    "BitMambaError": "model.errors", "ConfigError": "model.errors", "CheckpointError": "model.errors",
    "DataError": "model.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
