"""Flat buffers for a training step: one buffer per dtype, the name -> array dict as views into it.

    layout = flat.plan({name: (shape, dtype)}, decayed=model.is_decayed)   # pure: where each array lives
    params = flat.FlatArrays(layout, backend)          # zeroed buffers; params.arrays[name] is a view
    params.assign(init_params(cfg))                    # copy a dict in (one copy per array)
    grads = flat.FlatArrays(layout, backend, tail=3)   # + 3 spare elements: the step's statistics
    for span in layout.spans:                          # the decayed arrays, then the others, per dtype
        params.span(span), grads.span(span)            # ... one contiguous 1-D view each

Parameters, gradients and the AdamW moments share one layout, so an update is one call per span
and the gradient Allreduce is one message over the gradient buffer itself (its tail carries the
loss and accuracy counts, so no packing copy). Inside a dtype's buffer the weight-decayed arrays
come first (in the given order), then the others: each group is one contiguous span. The views
are plain arrays (NumPy or CuPy), so checkpoints, the model and every params[name] caller work
unchanged; writing into a view writes the buffer.
"""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Slot:
    """Where one array lives: its dtype's buffer, from `offset`, `size` elements, viewed as `shape`."""
    dtype: np.dtype
    offset: int
    shape: tuple
    size: int


@dataclass(frozen=True)
class Span:
    """A contiguous run [start, stop) of one dtype's buffer holding only decayed or only other arrays."""
    dtype: np.dtype
    start: int
    stop: int
    decayed: bool


@dataclass(frozen=True)
class Layout:
    slots: dict          # name -> Slot, in the order the arrays were given
    sizes: dict          # dtype -> elements of that dtype's arrays (the buffer, less any tail)
    spans: tuple         # non-empty Spans, per dtype (in order of first appearance): decayed, then other
    main: np.dtype       # the dtype whose buffer carries a tail: the widest (counts stay exact longest)


def plan(specs, decayed):
    """The layout of `specs` (ordered name -> (shape, dtype)); `decayed(name)` picks the first span."""
    if not specs:
        raise ValueError("flat.plan: no arrays to lay out")
    by_dtype = {}
    for name, (shape, dtype) in specs.items():
        by_dtype.setdefault(np.dtype(dtype), []).append((name, tuple(int(s) for s in shape)))
    slots, sizes, spans = {}, {}, []
    for dtype, entries in by_dtype.items():
        at = 0
        for want in (True, False):
            start = at
            for name, shape in entries:
                if bool(decayed(name)) == want:
                    size = int(np.prod(shape, dtype=np.int64))
                    slots[name] = Slot(dtype, at, shape, size)
                    at += size
            if at > start:
                spans.append(Span(dtype, start, at, want))
        sizes[dtype] = at
    main = max(by_dtype, key=lambda d: d.itemsize)  # max keeps the first of equals
    return Layout({name: slots[name] for name in specs}, sizes, tuple(spans), main)


def plan_like(arrays, decayed):
    """The layout of a dict of arrays (their shapes and dtypes, in the dict's order)."""
    return plan({k: (a.shape, a.dtype) for k, a in arrays.items()}, decayed)


def view(buffer, slot):
    """The array of `slot` inside its dtype's buffer (a view: no copy)."""
    return buffer[slot.offset:slot.offset + slot.size].reshape(slot.shape)


class FlatArrays:
    """One zeroed buffer per dtype of `layout` on backend `be`, and `arrays`: name -> view into it.

    tail: spare elements after the arrays in the main dtype's buffer (`tail_view()`); they belong to
    no array (the gradient reducer puts the step's statistics there, in the same message).
    """

    def __init__(self, layout, be, tail=0):
        self.layout, self.be, self.tail = layout, be, int(tail)
        self.buffers = {dt: be.zeros((n + (self.tail if dt == layout.main else 0),), dt)
                        for dt, n in layout.sizes.items()}
        self.arrays = {name: view(self.buffers[s.dtype], s) for name, s in layout.slots.items()}

    def used(self, dtype):
        """The part of dtype's buffer that holds arrays (the tail excluded)."""
        return self.buffers[dtype][:self.layout.sizes[dtype]]

    def tail_view(self):
        main = self.layout.main
        return self.buffers[main][self.layout.sizes[main]:]

    def span(self, span):
        return self.buffers[span.dtype][span.start:span.stop]

    def assign(self, arrays):
        """Copy a name -> array dict in (same names, shapes; cast to the slot's dtype)."""
        check_names(arrays, self.layout, "assign")
        for name, a in arrays.items():
            dst = self.arrays[name]
            if tuple(a.shape) != tuple(dst.shape):
                raise ValueError(f"flat assign: {name!r} has shape {tuple(a.shape)}, the layout {tuple(dst.shape)}")
            dst[...] = self.be.asarray(a)
        return self


def check_names(arrays, layout, what):
    """ValueError naming the difference when `arrays` does not have exactly the layout's names."""
    missing = sorted(set(layout.slots) - set(arrays))
    extra = sorted(set(arrays) - set(layout.slots))
    if missing or extra:
        raise ValueError(f"flat {what}: names differ from the layout: missing {missing[:5]}, unexpected {extra[:5]}")
