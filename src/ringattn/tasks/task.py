"""What a task is: the base class every task file subclasses, and the registry it joins.

A task class says, as class attributes, what the model needs (head, causal, input kind, vocab,
classes), its default final length and curriculum, one line of help and the reference
presentation's flags (`experiment`); its methods make the batches. Every batch is a FULL-sequence
batch that depends only on (seed, split, step); the trainer shards it over the ring.
"""
import numpy as np

_REGISTRY = {}


def register(cls):
    """Class decorator: make `cls` available as --task cls.name."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a task needs a name")
    _REGISTRY[cls.name] = cls
    return cls


def registered():
    return _REGISTRY


class Task:
    name = ""
    order = 100             # place in listings (--task choices, help)
    help = ""               # one line: what the task is
    head = "cls"            # "lm" (per-token labels, -1 = ignored) or "cls" (one label per sequence)
    causal = False
    input = "tokens"        # "tokens" (int ids < vocab) or "real" (float features)
    vocab = 1
    n_classes = 2
    seq_len = 1024          # default final (longest) sequence length
    curriculum = "none"     # default --curriculum
    local_window = -1       # default --local-window (-1: none)
    decay_steps = 0         # default --decay-steps (0: cosine over --steps)
    needs_data = False      # --data PATH is required
    experiment = ()         # flags of the reference presentation's run of this task (--experiment)
    options = ()            # the task's own flags (argparse dests) that change the math

    @classmethod
    def add_arguments(cls, group):
        """Add the task's own flags (shared by all tasks of the command line)."""

    @classmethod
    def info(cls, **options):
        """Model-facing facts: head, causal, input kind, vocab, n_classes, default seq_len."""
        return dict(head=cls.head, causal=cls.causal, input=cls.input, vocab=cls.vocab, n_classes=cls.n_classes,
                    seq_len=cls.seq_len)

    @classmethod
    def check_flags(cls, args):
        """Refuse flag values this task cannot use (UsageError); runs identically on every rank."""

    def __init__(self, args):
        """One run's task from its flags; may raise ValueError/OSError (reported as a flag error)."""
        self.seed = args.seed
        self.opts = {k: getattr(args, k) for k in self.options}
        self._eval = {}

    def model_kwargs(self):
        info = self.info(**self.opts)
        keys = ("head", "causal", "input", "vocab", "n_classes", "in_features")
        return {k: info[k] for k in keys if k in info}

    def batch(self, step, seq_len, batch, split="train"):
        """Full-sequence (x, labels) of batch `step` of `split` ('train' or 'eval')."""
        raise NotImplementedError

    def eval_set(self, seq_len, n, chunk=64):
        """n held-out sequences (the 'eval' split), the same every call."""
        key = (seq_len, n)
        if key not in self._eval:
            parts = [self.batch(i, seq_len, min(chunk, n - s), split="eval") for i, s in enumerate(range(0, n, chunk))]
            self._eval[key] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        return self._eval[key]
