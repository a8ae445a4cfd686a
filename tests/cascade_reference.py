"""The cascade's stages written from their definitions in float64, for the committee and fitting tests."""

import jax.numpy as jnp
import numpy as np
import scipy.special


def reference_stages(logits_MNK, rule, confidence):
    """float64 combined logits [M, N, K] and confidences [M, N], written from the definitions."""
    x = np.asarray(logits_MNK, np.float64)
    if rule == "ensemble":
        x = np.cumsum(x, axis=0) / np.arange(1, len(x) + 1)[:, None, None]
    probs = scipy.special.softmax(x, axis=-1)
    if confidence == "max_prob":
        conf = probs.max(-1)
    elif confidence == "margin":
        top = np.sort(probs, axis=-1)
        conf = top[..., -1] - top[..., -2]
    elif confidence == "neg_entropy":
        conf = np.sum(scipy.special.xlogy(probs, probs), axis=-1)
    else:
        conf = np.asarray(confidence(jnp.asarray(probs, jnp.float32)), np.float64)
    return x, conf
