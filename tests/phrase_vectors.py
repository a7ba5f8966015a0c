"""A stand-in phrase embedding for metric tests: exact cosines by hand, no sentence model to load."""

import numpy as np

from prima.evaluation.metrics import phrase_words

_VOCAB: dict[str, int] = {}


def bag_of_words(phrases):
    """Unit-norm word-count vectors, one dimension per word ever seen (cos("cup", "mug") = 0); zero rows for
    phrases without words."""
    out = np.zeros((len(phrases), 256))
    for i, p in enumerate(phrases):
        for w in phrase_words(p):
            out[i, _VOCAB.setdefault(w, len(_VOCAB))] += 1.0
        n = np.linalg.norm(out[i])
        if n:
            out[i] /= n
    return out
