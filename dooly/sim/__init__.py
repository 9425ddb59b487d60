"""Simulation: workloads, scheduler models of real engines, step latency, validation, exporters.

Light on imports on purpose: `dooly --help` and the GPU image import nothing heavy from here.
"""
