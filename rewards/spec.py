"""User code named by a spec string: the one grammar and importer behind reward and tool specs.

A spec is one of

- ``NAME`` (no colon): a built-in, looked up by the caller;
- ``path/to/file.py:attr``: a file (it ends in ``.py`` or contains a path separator); a relative path
  is resolved against ``base_dir`` (the config file's directory; default the cwd);
- ``package.module:attr``: a module imported normally.

`SpecLoader` parses and imports them and raises its caller's error type with a message that names
the spec and what is wrong (the file, the module, the missing attribute). A file is imported once
per process, as a module named after its absolute path, so loading it again (another reward, a
tool from the same file) reuses that module. Standalone: imports nothing of model/rollout/rl.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from rewards.errors import RewardSpecError


@dataclass(frozen=True)
class UserSpec:
    """A parsed spec. kind: builtin | file | module; target: the built-in name, the file's absolute
    path or the module name; attr: the object's name in it ("" for a built-in); text: the spec as given."""

    text: str
    kind: str
    target: str
    attr: str = ""


@dataclass(frozen=True)
class SpecLoader:
    """Parses and imports specs for one kind of user code, named in its errors.

    label: how errors name a spec ("reward spec", "tool spec"); noun: what the attribute is
    ("function", "object"); error: the exception type raised.
    """

    label: str = "spec"
    noun: str = "object"
    error: type[Exception] = RewardSpecError

    def fail(self, spec: str, message: str) -> Exception:
        """The error for `spec`: `label 'spec': message`."""
        return self.error(f"{self.label} {spec!r}: {message}")

    def parse(self, spec: str, base_dir: str | None = None) -> UserSpec:
        """Split `spec` (stripped) into kind, target and attribute; a file path made absolute."""
        text = spec.strip()
        if ":" not in text:
            return UserSpec(text, "builtin", text)
        target, _, attr = text.rpartition(":")
        if not target or not attr.isidentifier():
            raise self.fail(text, f"expected NAME, path/to/file.py:{self.noun} or package.module:{self.noun}")
        if target.endswith(".py") or "/" in target or os.sep in target:
            path = target if os.path.isabs(target) else os.path.join(base_dir or os.getcwd(), target)
            return UserSpec(text, "file", os.path.abspath(path), attr)
        return UserSpec(text, "module", target, attr)

    def load(self, spec: str | UserSpec, base_dir: str | None = None) -> Any:
        """The object a file or module spec names (a `UserSpec` or a string, parsed against `base_dir`)."""
        us = spec if isinstance(spec, UserSpec) else self.parse(spec, base_dir)
        if us.kind == "file":
            module = self.import_file(us.target, us.text)
            if not hasattr(module, us.attr):
                have = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
                raise self.fail(us.text, f"{us.target} has no {self.noun} {us.attr!r} "
                                         f"(callables there: {', '.join(have) or 'none'})")
        elif us.kind == "module":
            try:
                module = importlib.import_module(us.target)
            except ImportError as e:
                raise self.fail(us.text, f"cannot import module {us.target!r}: {e}") from e
            if not hasattr(module, us.attr):
                raise self.fail(us.text, f"module {us.target!r} has no {self.noun} {us.attr!r}")
        else:
            raise self.fail(us.text, f"a built-in name, not path/to/file.py:{self.noun} or "
                                     f"package.module:{self.noun}")
        return getattr(module, us.attr)

    def import_file(self, path: str, spec: str) -> ModuleType:
        """Import the Python file at `path` (once per process); any failure names `spec` and the file."""
        if not os.path.isfile(path):
            raise self.fail(spec, f"file not found: {path}")
        mod_name = "_user_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
        module = sys.modules.get(mod_name)
        if module is not None:
            return module
        ispec = importlib.util.spec_from_file_location(mod_name, path)
        if ispec is None or ispec.loader is None:
            raise self.fail(spec, f"cannot import {path}")
        module = importlib.util.module_from_spec(ispec)
        sys.modules[mod_name] = module
        try:
            ispec.loader.exec_module(module)
        except Exception as e:   # user code: any import-time failure is a spec error
            del sys.modules[mod_name]
            raise self.fail(spec, f"importing {path} failed: {type(e).__name__}: {e}") from e
        return module
