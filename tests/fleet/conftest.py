"""The fleet tests' fixtures live in fleet_support.py, importable by name from the tests too."""

from fleet_support import dead_kubeconfig, fake_api, kubeconfig, small_fleet  # noqa: F401
