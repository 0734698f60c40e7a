"""reuters: newswire topic (46 classes) from the user's Keras-format reuters.npz (8982 train, 2246 test)."""
from .keras_text import KerasTextTask
from .task import register


@register
class Reuters(KerasTextTask):
    name = "reuters"
    order = 3
    help = "Reuters newswire topics, 46 classes (Keras reuters.npz via --data)"
    vocab, n_classes, seq_len = 10000, 46, 2400
    # The presentation: 2400 tokens, 46 classes, batch 16, 20 epochs (20 x 8982 // 16 steps),
    # accuracy over the whole test set.
    experiment = ("--task", "reuters", "--seq-len", "2400", "--batch", "16", "--steps", "11220",
                  "--target-accuracy", "0", "--eval-size", "2246")
