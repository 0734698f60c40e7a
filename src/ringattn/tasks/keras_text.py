"""What the Keras-format text tasks (imdb, reuters) share: a dataset file, padded token ids.

Token ids as Keras' loaders make them (data.load_keras_text). Train batches: a per-epoch
shuffle of the train split; held-out: the test split in order.
"""
from .. import data
from ..parallel import UsageError
from .task import Task


class KerasTextTask(Task):
    head, causal, input = "cls", False, "tokens"
    needs_data = True

    @classmethod
    def check_flags(cls, args):
        if not args.data:
            raise UsageError(f"--task {cls.name} needs --data PATH ({cls.name}.npz in Keras format)")

    @classmethod
    def load(cls, path, seq_len=None, vocab=None):
        """The dataset file at `path`, padded to seq_len (default: the task's)."""
        return data.load_keras_text(path, cls.name, cls.seq_len if seq_len is None else seq_len,
                                    cls.vocab if vocab is None else vocab, cls.n_classes)

    def __init__(self, args):
        super().__init__(args)
        self.dataset = self.load(args.data, seq_len=args.seq_len)

    def batch(self, step, seq_len, batch, split="train"):
        if self.dataset.x_train.shape[1] != seq_len:
            raise ValueError(f"{self.name}: dataset was padded to {self.dataset.x_train.shape[1]} tokens, "
                             f"asked for {seq_len}")
        return data.text_batch(self.dataset, batch, self.seed, step, split)
