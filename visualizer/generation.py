"""Stitch the attention maps of the decoding steps of ``generate()`` into one picture.

With a KV cache, a decoder runs once over the prompt and then once per new
token, so one attention module gives one map per step: the prompt step
``(B, H, P, P)``, then ``(B, H, 1, P + 1)``, ``(B, H, 1, P + 2)``, ... (one new
query row over every key so far).  :func:`stitch` puts those rows where they
belong and returns one causal ``(B, H, T, T)`` matrix, ``T = P + steps - 1``:
the attention of a single forward pass over the final sequence without its
last token (that token was generated but never fed back).

Continuous batching (transformers' ``generate_batch``) packs several requests
into each forward; their maps are captured per request, under keys tagged
with the request id (``'model.layers.0.self_attn[req_0]'`` in ``by_module``):
``steps_by_module(model, cache, request='req_0')`` gives one request's steps,
stitched like ``generate()``'s, and :func:`requests` lists the ids.

Everything here is plain NumPy on the shapes and values of the maps: torch
tensors are accepted and converted (torch is never imported here), and nothing
depends on how the maps were captured (``get_local.capture()`` during
``generate()``, or ``generate(output_attentions=True)`` with the eager path).

Caches.  Where each step's keys sit is read from its key count ``K`` and the
step's query position ``p``:

* ``K == p + 1``: a dynamic cache, keys ``0 .. p``.
* ``K > p + 1``: a static cache (``cache_implementation='static'``), keys
  ``0 .. K - 1`` of which the future ones must hold no weight (checked).
* ``K < p + 1``: a sliding-window cache (Mistral, Gemma 2's local layers), the
  last ``K`` positions ``p - K + 1 .. p``; once a cache slides, every later
  step must have the same ``K`` (checked).

Sampling changes nothing: each step attends to the tokens actually chosen, and
the stitched matrix is that of the sampled sequence.  Beam search reorders the
cache between steps, so the row of batch slot ``j`` at step ``s`` belongs to
whichever hypothesis sits in slot ``j`` then; pass ``beam_indices`` (from
``generate(..., return_dict_in_generate=True, output_scores=True)``) and each
returned sequence gets its own rows, taken from the slot its prefix occupied
at each step.  Without ``beam_indices`` a beam search's rows cannot be told
apart from a plain batch and would mix hypotheses: do not stitch beams without
them.

>>> import numpy as np
>>> prompt = np.array([[[[1.0, 0.0], [0.5, 0.5]]]])           # (1, 1, 2, 2)
>>> step = np.array([[[[0.2, 0.3, 0.5]]]])                     # (1, 1, 1, 3)
>>> stitch([prompt, step])[0, 0]
array([[1. , 0. , 0. ],
       [0.5, 0.5, 0. ],
       [0.2, 0.3, 0.5]])
"""
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ._errors import CaptureWarning, VisualizerTypeError, VisualizerValueError
from ._state import split_request_key
from .attention import as_array

__all__ = ["stitch", "split_runs", "steps_by_module", "split_layers", "requests"]

# Weight allowed on keys a row cannot see (future or padded positions): the
# softmax of a masked score is exactly 0 in float32, but bf16/fp16 captures
# and additive masks of finite size leave crumbs.
_MASKED_ATOL = 1e-4
# A row of probabilities sums to at most 1 (less with attention sinks, whose
# weight is not on any key).
_SUM_ATOL = 1e-2


def _array(value: Any, what: str) -> np.ndarray:
    """``value`` as a NumPy array of numbers, in its own dtype (half precisions as float32)."""
    array = as_array(value, what, dtype=None)
    if array.dtype.kind not in "fiu":
        raise VisualizerTypeError("{} has dtype {}, not attention probabilities".format(
            what, array.dtype))
    return array


def _steps(step_maps: Any) -> List[np.ndarray]:
    if isinstance(step_maps, Mapping):
        raise VisualizerTypeError(
            "stitch takes the step maps of ONE attention module, got a dict of {} entries "
            "(keys {}); pick one, e.g. stitch(steps['model.layers.0.self_attn']) with "
            "steps = visualizer.generation.steps_by_module(model, cache)".format(
                len(step_maps), ", ".join(repr(k) for k in list(step_maps)[:3])))
    if hasattr(step_maps, "shape") or isinstance(step_maps, (str, bytes)) \
            or not isinstance(step_maps, Sequence):
        raise VisualizerTypeError(
            "stitch takes a list of per-step maps (the prompt step (B, H, P, P), then "
            "(B, H, 1, P + i) per new token), got {}{}".format(
                type(step_maps).__name__,
                " of shape {}".format(tuple(step_maps.shape)) if hasattr(step_maps, "shape")
                else ""))
    if len(step_maps) == 0:
        raise VisualizerValueError(
            "stitch got no step maps: nothing was captured for this module (was generate() "
            "run under get_local.capture()?)")
    arrays = []
    for s, value in enumerate(step_maps):
        array = _array(value, "step {}".format(s))
        if array.ndim != 4:
            raise VisualizerValueError(
                "step {} has shape {}; every step map must be 4-D (batch, heads, queries, "
                "keys){}".format(s, tuple(array.shape),
                                 " (add the batch axis: m[None])" if array.ndim == 3 else ""))
        if 0 in array.shape:
            raise VisualizerValueError("step {} is empty (shape {})".format(s, tuple(array.shape)))
        arrays.append(array)
    batch, heads = arrays[0].shape[:2]
    for s, array in enumerate(arrays[1:], 1):
        if array.shape[:2] != (batch, heads):
            raise VisualizerValueError(
                "step {} has batch {} and {} heads, step 0 has batch {} and {} heads: these "
                "are not the steps of one generate() call of one module (split several calls "
                "with split_runs or steps_by_module(run=...))".format(
                    s, array.shape[0], array.shape[1], batch, heads))
        if array.shape[2] != 1:
            raise VisualizerValueError(
                "step {} has {} query rows (shape {}); after the prompt step each decoding "
                "step adds one row. Several generate() calls in one list? Split them with "
                "split_runs or steps_by_module(run=...); decoding that feeds several tokens per "
                "step (assisted/speculative) is not supported".format(
                    s, array.shape[2], tuple(array.shape)))
    return arrays


def _prompt_length(first: np.ndarray) -> int:
    """The prompt length of a prompt step: its row count, or for one row, its last seen key + 1."""
    if first.shape[2] > 1:
        return first.shape[2]
    seen = np.nonzero(np.abs(first).reshape(-1, first.shape[-1]).max(axis=0) > _MASKED_ATOL)[0]
    return int(seen[-1]) + 1 if seen.size else 1


def _mask(attention_mask: Any, rows: int, length: int, prompt: int) -> Optional[np.ndarray]:
    if attention_mask is None:
        return None
    mask = _array(attention_mask, "attention_mask")
    if mask.ndim != 2 or mask.shape[0] != rows:
        raise VisualizerValueError(
            "attention_mask has shape {}; expected (batch, length) with batch {} (one row per "
            "stitched sequence: with beam_indices, one per returned sequence)".format(
                tuple(mask.shape), rows))
    if mask.shape[1] < prompt:
        raise VisualizerValueError(
            "attention_mask covers {} positions, fewer than the prompt's {}: pass the mask "
            "given to generate() (or that of the final sequences)".format(mask.shape[1], prompt))
    full = np.ones((rows, length), dtype=bool)
    keep = min(length, mask.shape[1])
    full[:, :keep] = mask[:, :keep] != 0
    return full


def stitch(step_maps: Sequence[Any], attention_mask: Any = None, *,
           beam_indices: Any = None, prompt_length: Optional[int] = None,
           cross: bool = False) -> np.ndarray:
    """Stitch one module's per-step attention maps from ``generate()`` into one matrix.

    ``step_maps`` are the maps of one attention module in step order: the
    prompt step ``(B, H, P, K0)``, then ``(B, H, 1, K)`` per decoding step
    (NumPy arrays or torch tensors).  Returns a ``(B, H, T, T)`` array (float64
    if a step is float64, else float32),
    ``T = P + len(step_maps) - 1``, zero above the diagonal, equal to the
    attention of one forward pass over the final sequence without its last
    token.  The module docstring says how dynamic, static and sliding-window
    caches, sampling and beam search are handled.

    Row-only captures (``get_local.capture(queries=-1)``, or
    ``output_attentions`` sliced to the last row) give ``(B, H, 1, K)`` at
    every step, the prompt step included (its last row, position ``P - 1``).
    Then only the rows that were captured come back: ``(B, H, steps, T)``,
    the rows of positions ``P - 1 .. T - 1``, equal to ``full[..., P - 1:, :]``
    (the attention that produced each generated token).  ``P`` is read from
    the prompt step (the row's last key with weight, + 1); pass
    ``prompt_length`` where that cannot tell, e.g. for a sliding window exactly
    as long as the prompt.

    ``attention_mask`` (``(B, L)``, the mask given to ``generate()`` or that
    of the final sequences, ``L >= P``; positions past ``L`` count as tokens)
    handles left padding: the rows AND columns of padded positions are set to
    0 (a padded query's row is meaningless: every key is masked), and any real
    row that puts weight on a padded key is an error (a mask that does not
    belong to these maps).  Positions keep their padded layout: position ``t``
    of sample ``b`` is ``sequences[b, t]``, so ``stitched[b, :, pad:, pad:]``
    is sample ``b``'s own matrix.

    ``beam_indices`` (``(R, steps)`` from ``generate(..., num_beams=k,
    return_dict_in_generate=True, output_scores=True)``): each of the ``R``
    returned sequences gets the rows of the slot that held its prefix at each
    step; the result is ``(R, H, T, T)``.  Steps after a sequence finished
    (index -1) stay zero.

    ``cross=True`` stitches a cross-attention module (encoder-decoder): each
    step's rows are over the same encoder keys, so the rows are stacked into
    ``(B, H, T, S)`` as they are.

    >>> import numpy as np
    >>> rows = [np.array([[[[0.5, 0.5]]]]), np.array([[[[0.2, 0.3, 0.5]]]])]
    >>> stitch(rows).shape      # a row-only capture: the rows of positions 1 and 2
    (1, 1, 2, 3)
    """
    steps = _steps(step_maps)
    first = steps[0]
    batch, heads = first.shape[:2]
    dtype = np.float64 if any(s.dtype == np.float64 for s in steps) else np.float32
    n = len(steps)

    if cross:
        if attention_mask is not None:
            raise VisualizerValueError(
                "stitch(cross=True) takes no attention_mask: cross-attention rows are stacked "
                "as captured (padded encoder keys already hold no weight)")
        width = first.shape[3]
        for s, step in enumerate(steps):
            if step.shape[3] != width:
                raise VisualizerValueError(
                    "cross-attention step {} has {} keys, step 0 has {}: every step of a "
                    "cross-attention module sees the same encoder keys".format(
                        s, step.shape[3], width))
        return np.concatenate(steps, axis=2).astype(dtype, copy=False)

    rows_only = first.shape[2] == 1
    if prompt_length is not None:
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, (int, np.integer)) \
                or prompt_length < 1:
            raise VisualizerValueError(
                "prompt_length must be a positive int, got {!r}".format(prompt_length))
        prompt = int(prompt_length)
        if first.shape[2] not in (1, prompt):
            raise VisualizerValueError(
                "step 0 has {} query rows; with prompt_length={} the prompt step has {} rows "
                "(full) or 1 (row-only)".format(first.shape[2], prompt, prompt))
    else:
        prompt = _prompt_length(first)
        if rows_only and prompt == first.shape[3] > 1 and n > 1 and steps[1].shape[3] == prompt:
            raise VisualizerValueError(
                "cannot tell these steps apart: one row over {k} keys, then every step over {k} "
                "keys too. For a cross-attention module pass cross=True; for self-attention "
                "with a sliding window as long as the prompt, pass prompt_length={k}".format(
                    k=prompt))
    if first.shape[3] < prompt:
        raise VisualizerValueError(
            "step 0 has {} query rows but only {} keys: a prompt step sees every prompt "
            "token".format(first.shape[2], first.shape[3]))
    if rows_only and prompt > 1 and first.shape[2] == 1:
        queries = np.arange(prompt - 1, prompt - 1 + n)
    else:
        rows_only = False
        queries = np.arange(prompt + n - 1)
    length = prompt + n - 1

    # Which step and which row of it holds each stitched row.
    if beam_indices is not None:
        beams = _array(beam_indices, "beam_indices")
        if beams.ndim != 2 or beams.dtype.kind not in "iu":
            raise VisualizerValueError(
                "beam_indices must be a 2-D integer array (returned sequences, steps), got "
                "shape {} dtype {}".format(tuple(beams.shape), beams.dtype))
        if beams.shape[1] < n:
            raise VisualizerValueError(
                "beam_indices has {} columns for {} steps: pass the beam_indices of the same "
                "generate() call (one column per generated token)".format(beams.shape[1], n))
        if beams.shape[1] > n and np.any(beams[:, n:] >= 0):
            raise VisualizerValueError(
                "beam_indices has {} columns (generated tokens) but there are only {} steps: "
                "a step is missing, or these maps are not of that call".format(
                    beams.shape[1], n))
        beams = beams[:, :n].astype(np.int64)
        if np.any(beams >= batch) or np.any(beams < -1):
            raise VisualizerValueError(
                "beam_indices holds slot {} but the steps have a batch of {} (batch x "
                "num_beams): these are not the maps of that beam search".format(
                    int(beams.max() if np.any(beams >= batch) else beams.min()), batch))
        out_batch = beams.shape[0]
    else:
        beams = None
        out_batch = batch
    mask = _mask(attention_mask, out_batch, length, prompt)

    out = np.zeros((out_batch, heads, len(queries), length), dtype=dtype)
    future = np.zeros((out_batch, len(queries)))  # weight on keys after each row's position
    slide = None  # the key count of a sliding cache, once it slides
    for s, step in enumerate(steps):
        if s == 0 and not rows_only:
            positions = np.arange(prompt)
        else:
            positions = np.array([prompt - 1 + s])
        if beams is not None:
            slots = beams[:, s]
            picked = np.where(slots[:, None, None, None] >= 0, step[np.maximum(slots, 0)], 0)
        else:
            picked = step
        keys = step.shape[3]
        for r, p in enumerate(positions):
            row = picked[:, :, r, :]
            out_row = int(p - queries[0])
            if keys >= p + 1:
                if keys > p + 1:
                    future[:, out_row] = np.abs(row[..., p + 1:]).max(axis=(1, 2))
                start, row = 0, row[..., :p + 1]
            else:
                where = "step {} (query position {}, {} keys)".format(s, p, keys)
                if s == 0:
                    raise VisualizerValueError(
                        "{} sees fewer keys than its position: a prompt step sees every "
                        "prompt token".format(where))
                if slide is not None and keys != slide:
                    raise VisualizerValueError(
                        "{}: the cache slid at {} keys on an earlier step, so every later step "
                        "has {} keys: steps missing, repeated or from several calls".format(
                            where, slide, slide))
                slide = keys
                start = p - keys + 1
            out[:, :, out_row, start:start + row.shape[-1]] = row
    live = np.ones((out_batch, len(queries)), dtype=bool)
    if mask is not None:
        live &= mask[:, queries]
    if beams is not None:
        # row of position q comes from step max(0, q - (P - 1))
        live &= beams[:, np.maximum(0, queries - (prompt - 1))] >= 0
    _check_rows(out, future, live, mask, queries, prompt)
    if mask is not None:
        keep = mask[:, None, None, :] & live[:, None, :, None]
        out = np.where(keep, out, 0).astype(dtype, copy=False)
    return out


def _check_rows(out, future, live, mask, queries, prompt):
    """Check that the real rows look like probabilities and ignore future and padded keys."""
    if np.any(future[live] > _MASKED_ATOL):
        b, i = (int(x) for x in np.argwhere(future * live > _MASKED_ATOL)[0])
        p = int(queries[i])
        raise VisualizerValueError(
            "step {} (query position {}) puts weight {:.3g} on keys after its own position: "
            "steps missing or out of order, several generate() calls in one list, or a "
            "cross-attention module (pass cross=True)".format(
                max(0, p - (prompt - 1)), p, float(future[b, i])))
    rows = out.transpose(0, 2, 1, 3)[live]  # (rows, heads, keys)
    if not rows.size:
        return
    if not np.all(np.isfinite(rows)):
        raise VisualizerValueError(
            "the maps hold NaN or inf in rows of real (not padded) tokens; for left-padded "
            "batches pass attention_mask")
    if rows.min() < -_MASKED_ATOL or np.any(rows.sum(-1) > 1 + _SUM_ATOL):
        raise VisualizerValueError(
            "the maps are not attention probabilities (negative values, or rows summing to "
            "{:.3g} > 1): capture the weights after softmax".format(float(rows.sum(-1).max())))
    if mask is not None:
        pads = np.broadcast_to(~mask[:, None, None, :],
                               (mask.shape[0], len(queries), 1, mask.shape[1]))[live]
        padded = np.abs(rows * pads)
        if padded.size and padded.max() > _MASKED_ATOL:
            raise VisualizerValueError(
                "attention_mask marks a position as padding, but a real token attends to it "
                "with weight {:.3g}: pass the mask given to generate() for these very "
                "sequences".format(float(padded.max())))


def split_runs(values: Sequence[Any]) -> List[List[Any]]:
    """Split one module's captures into the runs of its ``generate()`` calls (or forwards).

    A run starts with a prompt step and continues with one-row steps whose key
    count grows by one (dynamic cache), stays the same (static or slid
    cache), drops once after the prompt (a sliding window shorter than the
    prompt), or jumps once after the prompt to a static cache's size when
    the step puts no weight past its own position (transformers crops a
    static cache's keys to the prompt at prefill when no mask is needed).  A
    new run starts at a step with several rows, another batch or head count,
    a key count that jumps otherwise, or one that drops later on.  Two
    row-only (``queries=-1``) calls whose shapes happen to chain cannot be told
    apart: clear the cache between calls to be sure.

    >>> import numpy as np
    >>> a = [np.zeros((1, 2, 3, 3)), np.zeros((1, 2, 1, 4)), np.zeros((1, 2, 3, 3))]
    >>> [len(run) for run in split_runs(a)]
    [2, 1]
    """
    if isinstance(values, Mapping) or not isinstance(values, Sequence):
        raise VisualizerTypeError("split_runs takes one module's list of maps, got {}".format(
            type(values).__name__))
    runs = []  # type: List[List[Any]]
    previous = None
    start = 0
    for i, value in enumerate(values):
        shape = tuple(getattr(value, "shape", np.shape(value)))
        if len(shape) != 4:
            raise VisualizerValueError(
                "value {} has shape {}, not (batch, heads, queries, keys)".format(i, shape))
        new = previous is None or shape[:2] != previous[:2] or shape[2] != 1
        if not new:
            grown = shape[3] - previous[3]
            new = grown < 0 and i - start >= 2
            if grown > 1:
                new = i - start != 1 or not _static_after_prompt(values[start], value)
        if new:
            runs.append([])
            start = i
        runs[-1].append(value)
        previous = shape
    return runs


def _static_after_prompt(prompt_step: Any, step: Any) -> bool:
    """Whether ``step`` is the first decoding step over a static cache after ``prompt_step``.

    Its row (position ``P``, the prompt's length) has more keys than ``P + 1``
    and no weight on any key after its own position, where the prompt step of
    a new call would hold its own (positive) weight on its last key.
    """
    first = _array(prompt_step, "prompt step")
    row = _array(step, "decoding step")
    prompt = first.shape[2] if first.shape[2] > 1 else _prompt_length(first)
    return row.shape[3] > prompt + 1 and \
        not np.any(np.abs(row[..., prompt + 1:]) > _MASKED_ATOL)


def requests(captures: Mapping) -> List[str]:
    """Return the ids of the continuous-batching requests whose maps ``captures`` holds.

    ``captures`` is a cache (``get_local.capture()``'s, or a loaded file) or
    ``by_module``'s dict; ids in the order their keys first appear.

    >>> requests({'LlamaAttention.forward[req_1]': [], 'LlamaAttention.forward[req_0]': []})
    ['req_1', 'req_0']
    """
    if not isinstance(captures, Mapping):
        raise VisualizerTypeError("requests takes a cache or by_module's dict, got {}".format(
            type(captures).__name__))
    found = []  # type: List[str]
    for key in captures:
        request = split_request_key(key)[1]
        if request is not None and request not in found:
            found.append(request)
    return found


def _of_request(groups: Mapping, request: Optional[str]) -> Dict[str, Any]:
    """The groups of one request, names untagged (``request`` None: those of no request)."""
    picked = {}
    for name, values in groups.items():
        base, tag = split_request_key(name)
        if tag == request:
            picked[base] = values
    if request is None and not picked and groups:
        ids = requests(groups)
        if ids:
            raise VisualizerValueError(
                "the captures hold the maps of {} requests of a continuous batch ({}): pass "
                "request=, e.g. steps_by_module(model, cache, request={!r}); "
                "visualizer.generation.requests(cache) lists them".format(
                    len(ids), ", ".join(repr(r) for r in ids[:5]), ids[0]))
    if request is not None and not picked:
        raise VisualizerValueError(
            "no maps of request {!r} in the captures; requests found: {}".format(
                request, ", ".join(repr(r) for r in requests(groups)[:10]) or "none"))
    return picked


def steps_by_module(model: Any, cache: Any = None, *, run: Optional[int] = None,
                    request: Optional[str] = None) -> Dict[str, List[Any]]:
    """Return ``{module name: [step maps]}`` for the attention modules of ``model``.

    Regroups a capture taken around ``generate()`` with
    ``get_local.by_module(model, cache)`` (names as in
    ``model.named_modules()``), keeps the 4-D maps, and splits each module's
    list into its runs (:func:`split_runs`).  ``model`` may also be the dict
    ``by_module`` returned.  One ``generate()`` call gives one run per module;
    when the cache holds several, pass ``run`` (``-1``: the last call),
    otherwise it is an error.  Encoder modules of an encoder-decoder give one
    step (the encoder runs once); stitch cross-attention with ``cross=True``.
    ``request`` picks the steps of one request of a continuous batch
    (``model.generate_batch``): ``'req_0'``, as :func:`requests` lists them;
    a prompt its scheduler split into chunks is joined into one prompt step.

    >>> with get_local.capture() as cache:                     # doctest: +SKIP
    ...     out = model.generate(ids, max_new_tokens=8)
    >>> steps = steps_by_module(model, cache)                   # doctest: +SKIP
    >>> stitch(steps['model.layers.0.self_attn']).shape         # doctest: +SKIP
    (1, 4, 12, 12)
    """
    if isinstance(model, Mapping):
        groups = model
        if cache is not None:
            raise VisualizerTypeError(
                "steps_by_module got a dict (the by_module result) and a cache: pass one")
    else:
        from ._get_local import get_local

        groups = get_local.by_module(model, cache)
    groups = _of_request(groups, request)
    if request is not None:
        groups = {name: _join_chunks(values) for name, values in groups.items()}
    result = {}
    skipped = []
    several = {}
    for name, values in groups.items():
        if not values or not all(len(getattr(v, "shape", ())) == 4 for v in values):
            skipped.append(name)
            continue
        runs = split_runs(values)
        if run is None:
            if len(runs) > 1:
                several[name] = [len(r) for r in runs]
                continue
            result[name] = runs[0]
        else:
            if not -len(runs) <= run < len(runs):
                raise VisualizerValueError(
                    "run={} but module {!r} has {} run{} of captures".format(
                        run, name, len(runs), "" if len(runs) == 1 else "s"))
            result[name] = runs[run]
    if several:
        name, lengths = next(iter(several.items()))
        raise VisualizerValueError(
            "the captures hold several generate() calls (or forwards): module {!r} has {} runs "
            "of {} steps; pass run=i (run=-1 for the last), or clear the cache between "
            "calls".format(name, len(lengths), ", ".join(str(n) for n in lengths)))
    if not result:
        raise VisualizerValueError(
            "no attention maps (4-D captures) of any module of this model in the cache{}: "
            "was generate() run under get_local.capture() with the attention presets on?".format(
                " (found only {})".format(", ".join(skipped[:5])) if skipped else ""))
    if skipped:
        warnings.warn("steps_by_module left out {} (not 4-D attention maps)".format(
            ", ".join(repr(s) for s in skipped[:5])), CaptureWarning, stacklevel=2)
    return result


def _join_chunks(values: Sequence[Any]) -> List[Any]:
    """One request's maps with a prompt prefilled in chunks joined into one prompt step.

    Continuous batching may prefill a long prompt over several forwards: a
    square ``(1, H, c1, c1)`` step, then ``(1, H, c2, c1 + c2)`` and so on
    (every earlier key, then the chunk's own).  Joined, they are the prompt
    step ``(1, H, P, P)`` one forward would give, zero above the diagonal.
    """
    out = []  # type: List[Any]
    for value in values:
        shape = tuple(getattr(value, "shape", np.shape(value)))
        if len(out) == 1 and len(shape) == 4 and shape[2] > 1:
            last = out[0]
            rows, keys = last.shape[2], last.shape[3]
            if rows == keys and shape[3] == keys + shape[2] and tuple(last.shape[:2]) == shape[:2]:
                last, part = _array(last, "prompt step"), _array(value, "prefill chunk")
                joined = np.zeros(shape[:2] + (shape[3], shape[3]),
                                  dtype=np.result_type(last.dtype, part.dtype))
                joined[:, :, :rows, :keys] = last
                joined[:, :, rows:, :] = part
                out[0] = joined
                continue
        out.append(value)
    return out


def split_layers(values: Sequence[Any]) -> List[List[Any]]:
    """Split one key's flat list of generation captures into per-layer step lists, by shape.

    Without the modules (a file saved by ``visualizer run``), one key holds
    every layer's map of every step, layer by layer within a step:
    ``L`` maps of the prompt step's shape, then ``L`` of each decoding step.
    ``L`` is the length of the first run of equal shapes; every group of
    ``L`` must share a shape, and each layer's list must be generation steps
    (one run).  Raises :class:`VisualizerValueError` otherwise (a static
    row-only capture has no shape change to count layers by).

    >>> import numpy as np
    >>> flat = [np.zeros((1, 2, 3, 3))] * 2 + [np.zeros((1, 2, 1, 4))] * 2
    >>> [len(layer) for layer in split_layers(flat)]
    [2, 2]
    """
    shapes = [tuple(getattr(v, "shape", np.shape(v))) for v in values]
    if len(shapes) < 2 or any(len(s) != 4 for s in shapes):
        raise VisualizerValueError("not generation steps: need at least two 4-D maps")
    layers = 1
    while layers < len(shapes) and shapes[layers] == shapes[0]:
        layers += 1
    if layers == len(shapes) or len(shapes) % layers:
        raise VisualizerValueError(
            "not generation steps: {} maps cannot be split into layers by shape".format(
                len(shapes)))
    for g in range(0, len(shapes), layers):
        if len(set(shapes[g:g + layers])) != 1:
            raise VisualizerValueError(
                "not generation steps: maps {}..{} do not share one shape".format(
                    g, g + layers - 1))
    per_layer = [list(values[i::layers]) for i in range(layers)]
    if len(split_runs(per_layer[0])) != 1:
        raise VisualizerValueError("not generation steps: a layer's maps are not one run")
    return per_layer
