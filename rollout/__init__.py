"""Generation: sampling, decode backends, the continuous-batching engine, the naive reference, tokenizers.

    from rollout import Engine, GenRequest, SamplingParams, make_backend
    engine = Engine(make_backend(model), tokenizer=tok, slots=32)
    results = engine.generate([GenRequest(prompt_ids, SamplingParams(n=8, seed=1))])

Public names are imported lazily (as in `model`), so `rollout.types` users do not pay for the rest.
"""

from importlib import import_module

_EXPORTS = {
    "SamplingParams": "rollout.types", "GenRequest": "rollout.types", "GenResult": "rollout.types",
    "GenStats": "rollout.types",
    "Engine": "rollout.engine", "PauseView": "rollout.pauses",
    "DecodeBackend": "rollout.backends.base", "TorchBackend": "rollout.backends.torch_backend",
    "make_backend": "rollout.backends",
    "naive_generate": "rollout.reference",
    "build_tiny_tokenizer": "rollout.tokenizer", "load_tokenizer": "rollout.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")
