"""Importing transformers with its `models/` scan shared gives it the same lazy import structures."""

from __future__ import annotations

import subprocess
import sys

# Run in a fresh interpreter each (the hook acts only before transformers is first imported);
# prints a digest of both lazy modules' import structures and whether the scan cache is unbounded.
CHILD = """
import hashlib, sys
if sys.argv[1] == "shared":
    from dooly.models.hf_imports import share_import_structure_scans
    share_import_structure_scans()
import transformers.models.auto.configuration_auto
from transformers.utils import import_utils

def canon(value):
    if isinstance(value, dict):
        return "{" + ",".join(sorted(canon(k) + ":" + canon(v) for k, v in value.items())) + "}"
    if isinstance(value, (set, frozenset)):
        return "S[" + ",".join(sorted(canon(v) for v in value)) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(canon(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else type(value).__name__

text = "".join(canon(getattr(sys.modules[name], attribute))
               for name in ("transformers", "transformers.models")
               for attribute in ("_import_structure", "_class_to_module", "_object_missing_backend", "_modules"))
print(hashlib.sha256(text.encode()).hexdigest(), import_utils.create_import_structure_from_path.cache_info().maxsize)
"""


def _structure(mode: str) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    digest, maxsize = out.stdout.split()
    return digest, maxsize


def test_a_shared_models_scan_gives_the_same_import_structures():
    plain, shared = _structure("plain"), _structure("shared")
    assert shared[0] == plain[0]
    assert plain[1] != "None" and shared[1] == "None"
