"""The `dooly` command line.

Commands are loaded lazily from each stage's `commands` module, so `dooly --help` stays fast and
a machine without polars or boto3 (the GPU image) can still run `dooly trace` and `dooly profile`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

import click

from dooly import __version__
from dooly.distributed import apply_safe_env
from dooly.errors import DoolyError
from dooly.models.validation import allow_defaults_option

# name -> "module:attribute"; listed in pipeline order, which is also the order `--help` shows.
COMMANDS: dict[str, str] = {
    "models": "dooly.models.commands:models_command",
    "trace": "dooly.trace.commands:trace_command",
    "plan": "dooly.profile.commands:plan_command",
    "profile": "dooly.profile.commands:profile_command",
    "merge": "dooly.store.commands:merge_command",
    "fit": "dooly.fit.commands:fit_command",
    "predict": "dooly.fit.commands:predict_command",
    "simulate": "dooly.sim.commands:simulate_command",
    "bench": "dooly.engines.commands:bench_command",
    "model-cache": "dooly.engines.commands:model_cache_group",
    "trace-cache": "dooly.fit.trace_cache_commands:trace_cache_group",
    "overhead": "dooly.sim.commands:overhead_command",
    "calibrate": "dooly.sim.calibration_commands:calibrate_command",
    "validate": "dooly.sim.commands:validate_command",
    "server-costs": "dooly.sim.server_cost_commands:server_costs_command",
    "measure-steps": "dooly.engines.steps:measure_steps_command",
    "validate-steps": "dooly.sim.commands:validate_steps_command",
    "explore": "dooly.explore.commands:explore_command",
    "export": "dooly.sim.commands:export_group",
    "fleet": "dooly.fleet.commands:fleet_group",
    "demo": "dooly.fleet.commands:demo_command",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when used, and whose errors are one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if _available(name)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("dooly"):
                return None
            raise DoolyError(
                f"`dooly {cmd_name}` needs the Python package {exc.name!r}, which is not installed"
            ) from exc
        return getattr(module, attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DoolyError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except click.ClickException as exc:
            # click's usage errors (a bad number, a missing option) are bad input like any other:
            # one line, exit 2, so a script or a Job reads them the same way.
            click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            ctx.exit(exc.exit_code)


def _available(name: str) -> bool:
    module_name = COMMANDS[name].split(":")[0]
    return importlib.util.find_spec(module_name) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dooly")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
@allow_defaults_option
def cli(verbose: int) -> None:
    """Dooly predicts how fast an LLM serves on a GPU, engine and attention backend.

    It traces ONE forward pass per phase, labels every tensor dimension with its origin (model
    config or incoming batch), profiles only the operations its latency database lacks, fits
    regression models, and simulates serving on top of them.

    \b
    The pipeline, one command per stage:
      dooly trace meta-llama/Llama-3.1-8B --phase mixed     what runs, and where each dim comes from
      dooly plan  MODEL... --store ./db                     what is missing, what would be reused
      dooly profile MODEL... --store ./db                   measure only what is missing
      dooly merge --store ./db                              compact shards into a snapshot
      dooly fit   --store ./db                              regressors per platform and op class
      dooly simulate MODEL --store ./db ...                 serve a workload on the fitted models
      dooly bench MODEL --out gt/light ...                  the real engine on the same workload (GPU)
      dooly calibrate --store ./db --ground-truth gt/calib  the engine's host overhead, for every model
      dooly validate MODEL --ground-truth gt/light ...      the simulator against the real engine
    Every command takes --output json for scripts; bad input exits with code 2 and one line,
    a store that stays unreachable past the retry deadline with code 75 (docs/errors.md).
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main() -> None:
    apply_safe_env()
    try:
        cli(prog_name="dooly")
    except DoolyError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
