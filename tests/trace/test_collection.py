"""A trace pauses automatic garbage collection and leaves the caller's setting as it found it."""

from __future__ import annotations

import gc

import pytest

from dooly.trace.tracer import _collection_paused


@pytest.fixture
def restore_collection():
    enabled = gc.isenabled()
    yield
    if enabled:
        gc.enable()
    else:
        gc.disable()


@pytest.mark.usefixtures("restore_collection")
def test_collection_is_paused_during_a_trace_and_back_on_after_it():
    gc.enable()
    with _collection_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


@pytest.mark.usefixtures("restore_collection")
def test_collection_is_back_on_after_a_trace_that_failed():
    gc.enable()
    with pytest.raises(ValueError), _collection_paused():
        raise ValueError("the model's code failed")
    assert gc.isenabled()


@pytest.mark.usefixtures("restore_collection")
def test_a_caller_that_turned_collection_off_keeps_it_off():
    gc.disable()
    with _collection_paused():
        pass
    assert not gc.isenabled()
