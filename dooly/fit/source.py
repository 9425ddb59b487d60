"""The one entry to the fitted database: which models to read (`FittedSource`) and the step model
they make for one model (`open_step_model`).

Every reader (predict, simulate, validate, overhead, export, explore) goes through here, so the
rules of where fitted models and inventories come from live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from dooly.errors import DoolyError

if TYPE_CHECKING:
    from dooly.fit.predictor import Predictor, StepPredictor
    from dooly.fit.resolve import ResolvedInventory

DEFAULT_ENGINE = "transformers"
DEFAULT_DTYPE = "bfloat16"


@dataclass(frozen=True)
class FittedSource:
    """Where a prediction's fitted models come from: a store and the group of models in it.

    `tp` > 1 reads a tensor-parallel inventory (one rank's ops) and the collectives fitted on the
    platform; `interconnect` picks the collectives' topology where the store holds several."""

    store: str
    platform: str
    backend: str
    engine: str = DEFAULT_ENGINE
    dtype: str = DEFAULT_DTYPE
    tp: int = 1
    interconnect: str | None = None

    def __post_init__(self) -> None:
        if not self.platform or not self.backend:
            raise DoolyError("--store needs --platform and --backend to pick the fitted models")
        if self.tp < 1:
            raise DoolyError(f"--tp must be >= 1, got {self.tp}")

    def with_(self, **changes: Any) -> FittedSource:
        """A copy with some fields changed (a candidate of an exploration, another backend)."""
        return replace(self, **changes)

    def describe(self) -> str:
        return f"{self.platform} / {self.engine} / {self.backend} / {self.dtype}" + (f" / tp{self.tp}" if self.tp > 1 else "")


def open_predictor(source: FittedSource) -> Predictor:
    """The newest fitted models of the source's group, with the shared ops and collectives merged in."""
    from dooly.fit.persist import store_predictor
    from dooly.store.backends import open_store

    return store_predictor(
        open_store(source.store, create=False),
        platform=source.platform,
        engine=source.engine,
        backend=source.backend,
        dtype=source.dtype,
        interconnect=source.interconnect,
    )


def open_inventory(source: FittedSource, model: str) -> dict[str, Any]:
    """What MODEL runs per step (one rank's ops for tp > 1): the store's inventory for the source's
    engine, backend, dtype and tp, else a CPU trace made now (`dooly.fit.resolve`; nothing is
    written)."""
    return resolve_source_inventory(source, model).inventory


def resolve_source_inventory(source: FittedSource, model: str) -> ResolvedInventory:
    """`open_inventory` with where the inventory came from (the store, or a CPU trace)."""
    from dooly.fit.resolve import resolve_inventory
    from dooly.store.backends import open_store

    return resolve_inventory(
        open_store(source.store, create=False), model, backend=source.backend, engine=source.engine,
        dtype=source.dtype, tp=source.tp,
    )


@dataclass(frozen=True)
class FittedStep:
    """A fitted step model for one model, with what it was built from."""

    source: FittedSource
    predictor: Predictor
    inventory: dict[str, Any]
    step: StepPredictor
    # Where the inventory came from: the store, or a CPU trace made for this answer.
    inventory_origin: str = ""


def open_fitted_step(source: FittedSource, model: str) -> FittedStep:
    """Predictor, inventory and the step model they make, for MODEL under SOURCE."""
    predictor = open_predictor(source)
    resolved = resolve_source_inventory(source, model)
    return FittedStep(source=source, predictor=predictor, inventory=resolved.inventory,
                      step=predictor.step_predictor(resolved.inventory), inventory_origin=resolved.origin)


def open_step_model(source: FittedSource, model: str) -> StepPredictor:
    """The step model of MODEL under SOURCE: what simulate, validate and overhead run on."""
    return open_fitted_step(source, model).step
