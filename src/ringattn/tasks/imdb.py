"""imdb: movie-review sentiment from the user's Keras-format imdb.npz (25000 train, 25000 test)."""
from .keras_text import KerasTextTask
from .task import register


@register
class Imdb(KerasTextTask):
    name = "imdb"
    order = 2
    help = "IMDB review sentiment (Keras imdb.npz via --data)"
    vocab, n_classes, seq_len = 20000, 2, 200
    # The presentation: 6 blocks, width 128, 8 heads, 200 tokens, batch 64, 5 epochs
    # (5 x 25000 // 64 steps), accuracy over the whole test set.
    experiment = ("--task", "imdb", "--seq-len", "200", "--layers", "6", "--width", "128", "--heads", "8",
                  "--batch", "64", "--steps", "1950", "--target-accuracy", "0", "--eval-size", "25000")
