"""The code flags of ``visualizer._compat`` against the standard library's own."""
import inspect

import pytest

from visualizer import _compat


def test_code_flags_are_the_interpreters():
    for name in ("CO_VARARGS", "CO_VARKEYWORDS", "CO_GENERATOR", "CO_COROUTINE",
                 "CO_ITERABLE_COROUTINE", "CO_ASYNC_GENERATOR"):
        assert getattr(_compat, name) == getattr(inspect, name), name


def plain(a, b=1, *args, c, **kwargs):
    local = a
    return local


def no_star(a, *, b):
    local = a
    return local


def generator():
    yield 1


async def coroutine():
    return 1


async def async_generator():
    yield 1


@pytest.mark.parametrize("function", [plain, no_star, generator])
def test_argument_count_is_the_number_of_parameters(function):
    count = _compat.argument_count(function.__code__)
    assert count == len(inspect.signature(function).parameters)
    # co_varnames lists keyword-only arguments before *args: compare as sets
    assert set(function.__code__.co_varnames[:count]) == set(inspect.signature(function).parameters)


@pytest.mark.parametrize("function, plain_function", [
    (plain, True), (generator, False), (coroutine, False), (async_generator, False)])
def test_not_plain_flags_mark_generators_and_coroutines(function, plain_function):
    refused = inspect.isgeneratorfunction(function) or inspect.iscoroutinefunction(function) \
        or inspect.isasyncgenfunction(function)
    assert refused is not plain_function
    assert bool(function.__code__.co_flags & _compat.CO_NOT_PLAIN) is refused
