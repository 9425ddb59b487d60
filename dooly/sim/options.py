"""Options shared by the commands that run a step model (simulate, validate, overhead, export,
validate-steps): collected once into a `StepChoice` instead of nine positional arguments."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from dooly.errors import DoolyError
from dooly.fit.source import DEFAULT_DTYPE, FittedSource, FittedStep, open_fitted_step

if TYPE_CHECKING:
    from dooly.models.registry import ModelSpec
    from dooly.sim.step_model import ModelDims

logger = logging.getLogger(__name__)

STEP_OPTION_NAMES = ("analytic", "store", "platform", "backend", "dtype", "tp", "interconnect")


@dataclass(frozen=True)
class StepChoice:
    """Which step model a command runs: the analytic roofline, or fitted models from a store."""

    analytic: bool = False
    store: str | None = None
    platform: str | None = None
    backend: str | None = None
    dtype: str = DEFAULT_DTYPE
    tp: int = 1
    interconnect: str | None = None

    def check(self) -> None:
        if self.analytic == bool(self.store):
            raise DoolyError("choose exactly one step model: --analytic or --store URI")
        if self.tp < 1:
            raise DoolyError(f"--tp must be >= 1, got {self.tp}")

    def fitted(self, engine: str) -> FittedSource:
        """The store's models for ENGINE (the caller has checked this is not --analytic)."""
        if not self.store:
            raise DoolyError("--store URI is needed here")
        return FittedSource(
            store=self.store,
            platform=self.platform or "",
            backend=self.backend or "",
            engine=engine,
            dtype=self.dtype,
            tp=self.tp,
            interconnect=self.interconnect,
        )

    def with_(self, **changes: Any) -> StepChoice:
        from dataclasses import replace

        return replace(self, **changes)

    def step_model(self, model: str | None, engine: str) -> Any:
        """The step model to simulate MODEL with (the analytic one defaults to Llama-3.1-8B's dims)."""
        from dooly.sim.step_model import LLAMA_3_8B, AnalyticStepModel

        self.check()
        if self.analytic:
            dims = LLAMA_3_8B if model is None else model_dims(model)
            return AnalyticStepModel(dims=dims, tp=self.tp)
        if model is None:
            raise DoolyError("--store needs the MODEL argument")
        return self.fitted_step(model, engine).step

    def fitted_step(self, model: str, engine: str) -> FittedStep:
        """The store's step model of MODEL for ENGINE, with the predictor and inventory it is built
        from. MODEL goes to the resolver as the user named it (a bundled id, a config.json, a
        folder holding one, or an id the store holds): a config path must not be reduced to its
        stem, which names no config and is refused unless the store holds an inventory by that id."""
        return open_fitted_step(self.fitted(engine), model)


def model_spec(model: str, store_uri: str | None = None) -> ModelSpec:
    """The config MODEL names, as `dooly trace` reads it (a bundled id, a config.json, a folder
    holding one), else, given a store, the config the store keeps under that id or model key. The
    store is opened only for a name no config answers to: most names never need it."""
    from dooly.models.registry import resolve_model
    from dooly.models.stored import resolve_model_with_store
    from dooly.store.backends import open_store

    try:
        return resolve_model(model)
    except DoolyError:
        if not store_uri:
            raise
    return resolve_model_with_store(model, open_store(store_uri, create=False))


def model_dims(model: str, store_uri: str | None = None) -> ModelDims:
    """Config facts of MODEL (see `model_spec`)."""
    from dooly.sim.step_model import ModelDims

    spec = model_spec(model, store_uri)
    return ModelDims.from_config(spec.config, name=spec.model_id)


def with_model_groups(model: str | None, engine: str, settings: dict[str, Any],
                      store_uri: str | None = None) -> dict[str, Any]:
    """The engine settings plus how the model's layer groups charge KV blocks (transformers:
    a sliding-window model holds more blocks per request); settings given explicitly win. A
    model known by the store's inventories only (no config) is charged as full attention, with a
    warning. A name nothing resolves (no config, no store given, or one that knows no such model)
    gets the settings unchanged and no warning: the command's own resolution of the model refuses
    it in one error line, which a warning saying the store knows the model would contradict."""
    if model is None or engine != "transformers":
        return settings
    from dooly.models.layout import cache_groups_from_facts
    from dooly.models.stored import NoStoredConfig

    try:
        spec = model_spec(model, store_uri)
    except NoStoredConfig:
        logger.warning("%s is known to the store by its inventories only, not by a config: its KV blocks are "
                       "charged as for full attention", model)
        return settings
    except DoolyError as unresolved:
        logger.debug("%s: no config to read its KV layer groups from (%s)", model, unresolved)
        return settings
    # From the config facts when they suffice: importing transformers costs seconds of start-up.
    groups = cache_groups_from_facts(spec.config)
    if groups is None:
        from dooly.engines.transformers_cb import cache_groups
        from dooly.models.registry import build_hf_config

        groups = cache_groups(build_hf_config(spec))
    return {**groups, **settings}


def step_model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the step-model options to a command; it receives them as one `step_choice` argument."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in STEP_OPTION_NAMES}
        return func(*args, step_choice=StepChoice(**values), **kwargs)

    options = [
        click.option("--analytic", is_flag=True, help="Use the built-in roofline step model (no store; tests and demos only)."),
        click.option("--store", metavar="URI", help="Latency database (directory or s3://bucket/prefix) with fitted models."),
        click.option("--platform", metavar="P", help="GPU/CPU platform string the models were fitted for."),
        click.option("--backend", metavar="B", help="Attention backend, e.g. 'paged|sdpa'."),
        click.option("--dtype", default=DEFAULT_DTYPE, show_default=True, help="Model dtype of the fitted models."),
        click.option("--tp", type=int, default=1, show_default=True,
                     help="Tensor-parallel degree: each step is one rank's ops (a --tp trace) plus its collectives."),
        click.option("--interconnect", metavar="LABEL",
                     help="Topology label of the collectives' measurements, where the store holds several (e.g. NV18)."),
    ]
    decorated: Callable[..., Any] = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return decorated
