"""Importing transformers' model code without the optional libraries Dooly never calls into.

Building any causal-LM class (or reading transformers' causal-LM mapping) imports
`transformers.generation.utils` and `transformers.modeling_utils`, and through them two modules
that import a whole optional library at module level for one function:

- the assisted-decoding candidate generators import scikit-learn's `roc_curve` (to tune an
  assistant model's confidence threshold during `generate`), which loads scikit-learn, scipy.stats
  and narwhals: about 0.9 s of a trace's first phase on a 2-core machine;
- the object-detection losses (imported by modeling_utils) import scipy's `linear_sum_assignment`
  (Hungarian matching while training DETR-like models), which loads scipy.optimize: about 0.3 s.

No trace, profile or simulation calls either function. `import_transformers_lean` imports those
two modules with the library hidden from their availability check, then puts the check back and
binds each name to a stand-in that imports the library on its first call: the modules behave
exactly as before (the check answers truly, the function is the library's), only the import
waits until the function is used. It does nothing for a module already imported, or when the
library is already loaded (hiding it would save nothing).

Importing transformers also scans its `models/` folder twice for the lazy modules' import structure
(once for `transformers`, once for `transformers.models`), reading some 1,000 files each time: the
scan is memoised per folder, but in a cache of 128 entries, and the tree has over 500 folders, so
the second scan finds nothing left and redoes it all (about 0.25 s of a first phase).
`share_import_structure_scans` gives that scan an unbounded cache as its module is loaded, so the
second scan reuses the first's folders. Its results are the same (the scan only reads the files;
checked: both lazy modules' import structures are identical with and without it).
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeferredImport:
    """A transformers module whose module-level import of `library.name` can wait for its first call."""

    module: str  # the transformers module that imports it
    check: str  # the availability check in transformers.utils that guards that import
    library: str  # the module the name is imported from
    name: str


# The object-detection losses that import scipy's Hungarian matcher (transformers 5.x).
_DETECTION_LOSSES = ("deformable_detr", "for_object_detection", "grounding_dino", "lw_detr", "rf_detr", "rt_detr")
DEFERRED_IMPORTS = (
    DeferredImport("transformers.generation.candidate_generator", "is_sklearn_available", "sklearn.metrics",
                   "roc_curve"),
    *(DeferredImport(f"transformers.loss.loss_{loss}", "is_scipy_available", "scipy.optimize", "linear_sum_assignment")
      for loss in _DETECTION_LOSSES),
)


def _unavailable() -> bool:
    return False


def _on_first_call(library: str, name: str) -> Callable[..., Any]:
    """A function that imports `library.name` when called and forwards the call to it."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(library), name)(*args, **kwargs)

    call.__name__ = name
    call.__qualname__ = name
    return call


def _exists(module: str) -> bool:
    """Whether this transformers version has the module (the list names those of 5.x)."""
    from importlib.util import find_spec

    return find_spec(module) is not None


# The transformers module whose folder scan `share_import_structure_scans` memoises, and the scan.
IMPORT_STRUCTURE_MODULE = "transformers.utils.import_utils"
IMPORT_STRUCTURE_SCAN = "create_import_structure_from_path"


class _ScanCacheFinder(importlib.abc.MetaPathFinder):
    """A one-shot import hook: finds IMPORT_STRUCTURE_MODULE the ordinary way and, once the module
    has run, rebinds its folder scan to the same function under an unbounded cache."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != IMPORT_STRUCTURE_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            scan = getattr(getattr(module, IMPORT_STRUCTURE_SCAN, None), "__wrapped__", None)
            if scan is not None:
                setattr(module, IMPORT_STRUCTURE_SCAN, functools.cache(scan))
                logger.debug("%s.%s memoised without bound", fullname, IMPORT_STRUCTURE_SCAN)

        # Only this spec's loader (a fresh one per find) runs the wrapped exec_module.
        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


@functools.cache
def share_import_structure_scans() -> None:
    """Before transformers is first imported: let its second `models/` scan reuse the first (module
    docstring). Does nothing once transformers is imported."""
    if IMPORT_STRUCTURE_MODULE not in sys.modules:
        sys.meta_path.insert(0, _ScanCacheFinder())


@functools.cache
def import_transformers_lean() -> None:
    """Import the DEFERRED_IMPORTS modules with their library loaded on first use (module docstring)."""
    share_import_structure_scans()
    import transformers.utils

    for deferred in DEFERRED_IMPORTS:
        if deferred.module in sys.modules or deferred.library in sys.modules or not _exists(deferred.module):
            continue
        check = getattr(transformers.utils, deferred.check)
        setattr(transformers.utils, deferred.check, _unavailable)
        try:
            module = importlib.import_module(deferred.module)
        finally:
            setattr(transformers.utils, deferred.check, check)
        setattr(module, deferred.check, check)
        if check():
            setattr(module, deferred.name, _on_first_call(deferred.library, deferred.name))
        logger.debug("imported %s with %s deferred to its first call", deferred.module, deferred.library)
