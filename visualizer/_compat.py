"""Every difference between the CPython versions we support, in one place.

The rest of the package asks these flags and tables instead of reading
``sys.version_info`` itself, so dropping a version means deleting its flag
and the branches that name it.
"""
import sys

PY311 = sys.version_info >= (3, 11)
PY312 = sys.version_info >= (3, 12)
PY313 = sys.version_info >= (3, 13)

# 3.12 inlines comprehensions (PEP 709): a comprehension variable named like a
# free variable of the same function gets a second, hidden slot with that
# name.  On 3.13, bytecode 0.19 confuses the two slots: it cannot read some
# such functions (IndexError) and writes others back with a closure built from
# the wrong slot, so they are refused (see _rewrite.shadowed_names).
SHADOWED_SLOTS_UNSAFE = PY313

# Code object flags (Include/cpython/code.h); their values have not changed
# in any version we support.
CO_VARARGS = 0x04
CO_VARKEYWORDS = 0x08
CO_GENERATOR = 0x20
CO_COROUTINE = 0x80
CO_ITERABLE_COROUTINE = 0x100
CO_ASYNC_GENERATOR = 0x200
# A function with any of these does not return when its caller is done with it,
# so "the value when it returns" has no clear meaning: the rewrite refuses it.
CO_NOT_PLAIN = CO_GENERATOR | CO_COROUTINE | CO_ITERABLE_COROUTINE | CO_ASYNC_GENERATOR


def argument_count(code):
    """Return how many of ``code.co_varnames`` are arguments (``*args`` and ``**kwargs`` too)."""
    return (code.co_argcount + code.co_kwonlyargcount
            + bool(code.co_flags & CO_VARARGS) + bool(code.co_flags & CO_VARKEYWORDS))


# Instructions that end a function normally.  RETURN_CONST arrived in 3.12
# (python/cpython#101632) and returns without pushing the value first.
RETURN_OPS = frozenset({"RETURN_VALUE", "RETURN_CONST"})

# Instructions that bind a local.  The superinstructions of 3.13 store into
# one or both of the names in their tuple argument; see ``stored_names``.
STORE_OPS = frozenset({"STORE_FAST", "STORE_DEREF"})
STORE_FIRST_OPS = frozenset({"STORE_FAST_LOAD_FAST"})
STORE_BOTH_OPS = frozenset({"STORE_FAST_STORE_FAST"})

# Instructions that can leave a local unbound.  LOAD_FAST_AND_CLEAR (3.12,
# PEP 709 inlined comprehensions) saves and clears a name, and the matching
# STORE_FAST may put back "unbound"; we treat such a name like a deleted one.
UNBIND_OPS = frozenset({"DELETE_FAST", "DELETE_DEREF", "LOAD_FAST_AND_CLEAR"})


def call_ops(callable_op, args):
    """Return the ``(opname, arg)`` pairs that call a callable and push its result.

    ``callable_op`` is the pair that pushes the callable; ``args`` holds, for
    each argument, the list of pairs that push it.  The calling convention
    changed three times:

    * 3.8-3.10: ``callable, args; CALL_FUNCTION n``
    * 3.11: ``PUSH_NULL, callable, args; PRECALL n; CALL n``
    * 3.12: ``PUSH_NULL, callable, args; CALL n``
    * 3.13: ``callable, PUSH_NULL, args; CALL n`` (python/cpython#107788 moved
      the NULL after the callable).
    """
    n = len(args)
    arg_ops = [op for arg in args for op in arg]
    if PY313:
        return [callable_op, ("PUSH_NULL", None)] + list(arg_ops) + [("CALL", n)]
    if PY312:
        return [("PUSH_NULL", None), callable_op] + list(arg_ops) + [("CALL", n)]
    if PY311:
        return ([("PUSH_NULL", None), callable_op] + list(arg_ops)
                + [("PRECALL", n), ("CALL", n)])
    return [callable_op] + list(arg_ops) + [("CALL_FUNCTION", n)]


def load_global(name):
    """Return the ``(opname, arg)`` pair that pushes a global (or builtin) ``name``.

    From 3.11, ``LOAD_GLOBAL`` can also push a NULL; ``call_ops`` pushes its
    own, so the flag is off.
    """
    return ("LOAD_GLOBAL", (False, name) if PY311 else name)


def loaded_attribute(name, arg):
    """Return the attribute a plain ``obj.attr`` load reads, or None.

    Method loads (``LOAD_METHOD`` before 3.12, ``LOAD_ATTR`` with its low bit
    set from 3.12, which bytecode shows as ``(True, name)``) are not plain.
    """
    if name != "LOAD_ATTR":
        return None
    if PY312:
        is_method, attr = arg
        return None if is_method else attr
    return arg


def stored_names(name, arg):
    """Return the local names an instruction binds (empty for most)."""
    if name in STORE_OPS:
        return (_plain(arg),)
    if name in STORE_FIRST_OPS:
        return (_plain(arg[0]),)
    if name in STORE_BOTH_OPS:
        return (_plain(arg[0]), _plain(arg[1]))
    return ()


# Instructions that push locals (3.12: LOAD_FAST_CHECK; 3.13: LOAD_FAST_LOAD_FAST;
# 3.14: the borrowing forms, python/cpython#130704); see ``loaded_names``.
LOAD_OPS = frozenset({"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW", "LOAD_DEREF"})
LOAD_BOTH_OPS = frozenset({"LOAD_FAST_LOAD_FAST", "LOAD_FAST_BORROW_LOAD_FAST_BORROW"})


def loaded_names(name, arg):
    """Return the locals an instruction pushes, in the order pushed (empty for most)."""
    if name in LOAD_OPS:
        return (_plain(arg),)
    if name in LOAD_BOTH_OPS:
        return (_plain(arg[0]), _plain(arg[1]))
    if name in STORE_FIRST_OPS:
        return (_plain(arg[1]),)
    return ()


# Pushes a local that may be unbound, raising UnboundLocalError then (3.12+; before
# 3.12 plain LOAD_FAST checked).
CHECKED_LOAD = "LOAD_FAST_CHECK" if PY312 else "LOAD_FAST"

# ``a @ b``: its own instruction before 3.11, ``BINARY_OP`` with NB_MATRIX_MULTIPLY (4) since.
_MATMUL_OP = 4


def is_matmul(name, arg):
    """Whether an instruction computes ``a @ b`` (not ``a @= b``)."""
    if name == "BINARY_MATRIX_MULTIPLY":
        return True
    return name == "BINARY_OP" and int(arg) == _MATMUL_OP


def is_arithmetic(name, arg):
    """Whether an instruction is a binary or in-place operator other than indexing."""
    return name.startswith(("BINARY_", "INPLACE_")) and name not in ("BINARY_SUBSCR",
                                                                      "BINARY_SLICE")


def unbound_name(name, arg):
    """Return the local an instruction may unbind, or None."""
    if name in UNBIND_OPS:
        return _plain(arg)
    return None


def _plain(arg):
    # bytecode gives cell and free variables as CellVar/FreeVar objects.
    return getattr(arg, "name", arg)


def code_qualname(code, owner=None):
    """Return the qualified name of the function that runs ``code``, or None.

    3.11 gave code objects ``co_qualname``; before it, the name is found by
    looking for a function with this code among the attributes of ``owner``'s
    class and its bases (the ``self`` of a method), else None.
    """
    if PY311:
        return code.co_qualname
    if owner is None:
        return None
    for klass in type(owner).__mro__:
        for value in vars(klass).values():
            function = getattr(value, "__func__", value)
            if getattr(function, "__code__", None) is code:
                return function.__qualname__
    return None
