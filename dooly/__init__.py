"""Dooly: latency databases for LLM-serving simulators.

Data flows one way: config -> trace -> plan -> profile -> shards -> merge -> fit -> simulate.
"""

__version__ = "0.1.0"

# Bumped whenever the shard, snapshot or trace schema changes incompatibly.
SCHEMA_VERSION = 1
