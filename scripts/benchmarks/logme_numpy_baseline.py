"""LogME in float64 NumPy, step by step as the reference implementation runs it.

The baseline of `bench_logme.py` and `bench_scores.py`: an SVD of the D×D Gram matrix,
U = F V / σ, then a Python loop over the classes with the fixed point of You et al., JMLR 2022
(Alg. 2). Written here from the paper's math; it has no JAX in it, so importing it changes nothing
in the caller's JAX configuration.
"""

import numpy as np


def numpy_reference_logme(feats, labels):
    """LogME score of features [N, D] for integer labels [N], computed the reference's way."""
    feats = np.asarray(feats, np.float64)
    n, d = feats.shape
    _, eig, vh = np.linalg.svd(feats.T @ feats)
    sigma = np.sqrt(eig)
    k = int(np.sum(sigma > 1e-10))
    sigma, eig, vh = sigma[:k], eig[:k], vh[:k]
    u = feats @ vh.T / sigma  # [N, k]
    evidences = []
    for cls in np.unique(labels):
        y = (labels == cls).astype(np.float64)
        x2 = (u.T @ y) ** 2
        res_out = y @ y - x2.sum()
        alpha = beta = 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = np.sum(eig / (eig + t))
            m2 = np.sum(eig * x2 / (t + eig) ** 2)
            res2 = np.sum(x2 / (1 + eig / t) ** 2) + res_out
            alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        log_det = np.sum(np.log(alpha + beta * eig)) + (d - k) * np.log(alpha)
        evidence = (
            d / 2 * np.log(alpha) + n / 2 * np.log(beta) - log_det / 2
            - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi)
        )  # fmt: skip
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def main():
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("npz", help="a .npz with 'features' [N, D] and integer 'labels' [N]")
    args = parser.parse_args()
    with np.load(args.npz) as data:
        print(numpy_reference_logme(data["features"], data["labels"]))


if __name__ == "__main__":
    main()
