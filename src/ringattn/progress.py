"""One progress display for every long loop (the benchmark suite, the trainer).

`Progress(total, initial=0, active=True, plain=False)` draws a tqdm bar on stderr when tqdm is
installed (it is optional, so it is imported lazily) and `plain` is false; otherwise it prints plain
lines on stderr. An inactive display (e.g. on ranks other than 0) prints nothing at all.

API (every method is a no-op when inactive):
- `start(label)`      a named piece of work begins: the bar's description, or a line
                      "[i/total] label ..." (i = pieces done + 1).
- `step()`            one piece of work finished: the bar advances by one.
- `update(n, fields)` the position is now n (e.g. the training step) with `fields`, a dict of
                      already formatted values: the bar's postfix, or a line "step n: k v k v ...".
- `write(text)`       a message that does not break the bar (tqdm.write), or a plain line.
- `close()`           finish the bar.

The plain form is what logs and tests read, so its line formats are part of the API.
"""
import sys


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    def __init__(self, total, initial=0, active=True, plain=False, unit="step"):
        self.total, self.done, self.active, self.bar = total, initial, active, None
        tqdm = _tqdm() if active and not plain else None
        if tqdm is not None:
            self.bar = tqdm(total=total, initial=initial, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def _line(self, text):
        print(text, file=sys.stderr, flush=True)

    def start(self, label):
        if not self.active:
            return
        if self.bar is not None:
            self.bar.set_description(label)
        else:
            self._line(f"[{self.done + 1}/{self.total}] {label} ...")

    def step(self):
        if not self.active:
            return
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def update(self, n, fields):
        if not self.active:
            return
        self.done = n
        if self.bar is not None:
            self.bar.n = n
            self.bar.set_postfix(fields, refresh=True)
        else:
            self._line(f"step {n}: " + " ".join(f"{k} {v}" for k, v in fields.items()))

    def write(self, text):
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            self._line(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()
