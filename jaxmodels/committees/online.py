"""Online cascades: a request of 1..R images answered by one fixed-shape jitted call.

`Cascade.run` serves batches: it compacts the undecided rows between stages, so each stage runs
only on what is left, at the price of a host round trip per stage and one executable per
(stage, bucket). A request of a few images cannot amortise that. `OnlineCascade` pads every
request to R rows and runs the whole cascade as one jitted function on one device: stage 0, then
stage k only if a real row is still undecided (`lax.cond`: a request that stage 0 settles never
runs the later members), always on all R rows. One dispatch, one fetch, one compile. Wang et al.
(ICLR 2022) report cascades' savings as such online latency on TPUs; `request_latency` measures
it here, as percentiles over requests of random sizes.

Dimension names: R rows of a request (padded), K classes, M stages.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.committees import members as members_lib
from jaxmodels.committees import rules as cascade_rules
from jaxmodels.committees.executors import Cascade


class OnlineCascade:
    """`cascade`'s members, thresholds and rule, compiled for requests of at most `max_rows`.

    Args:
      cascade: the `Cascade` to serve (its members, thresholds, confidence and rule).
      max_rows: R, the largest request; every request is padded to R rows (default 8).
      device: where it runs (default the first local device).
    """

    def __init__(self, cascade: Cascade, max_rows: int = 8, device=None):
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an int ≥ 1; got {max_rows!r}")
        self.cascade, self.max_rows = cascade, max_rows
        self.device = device or jax.local_devices()[0]
        members = cascade.members
        self._variables = [jax.device_put(m.variables, self.device) for m in members]
        thresholds = tuple(cascade_rules.float32_thresholds(cascade.thresholds))
        confidence_fn, rule = cascade._confidence_fn, cascade.rule

        def stage(k, variables_k, images_RHWC, sum_prev_RK):
            m = members[k]
            logits_RK = members_lib.forward(m.apply_fn, m.preprocessing, variables_k, images_RHWC)
            sum_RK, combined_RK = cascade_rules.stage_combine(
                sum_prev_RK, logits_RK, stage=k, rule=rule
            )
            return sum_RK, combined_RK, cascade_rules.stage_confidence(combined_RK, confidence_fn)

        def answer(variables, images, valid_R):
            last = len(members) - 1
            sum_RK, answer_RK, conf_R = stage(0, variables[0], images[0], None)
            exit_R = jnp.zeros(valid_R.shape, jnp.int32)
            decided_R = ~valid_R | (conf_R > thresholds[0]) if last else jnp.ones_like(valid_R)
            carry = (answer_RK, exit_R, decided_R, sum_RK)
            for k in range(1, last + 1):

                def run(carry, k=k):
                    answer_RK, exit_R, decided_R, sum_prev_RK = carry
                    sum_RK, combined_RK, conf_R = stage(k, variables[k], images[k], sum_prev_RK)
                    now_R = ~decided_R & ((conf_R > thresholds[k]) if k < last else True)
                    answer_RK = jnp.where(now_R[:, None], combined_RK, answer_RK)
                    exit_R = jnp.where(now_R, k, exit_R)
                    return answer_RK, exit_R, decided_R | now_R, sum_RK

                # every row settled: the later members' compute is skipped, not masked
                carry = jax.lax.cond(jnp.all(carry[2]), lambda c: c, run, carry)
            return carry[0], carry[1]

        self._answer = jax.jit(answer)

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Answers one request.

        Args:
          images: [N, H, W, 3] with 1 ≤ N ≤ R, or one such array per member (as `Cascade.run`).

        Returns:
          (logits_NK of the answering stage, exit_N: the stage that answered each image).
        """
        inputs = members_lib.member_inputs(images, self.cascade.members)
        n = len(inputs[0])
        if not 1 <= n <= self.max_rows:
            raise ValueError(f"a request holds 1 to {self.max_rows} images; got {n}")
        uploaded = {}  # members sharing one input array share its upload
        for x in inputs:
            if id(x) not in uploaded:
                pad = np.zeros((self.max_rows - n, *x.shape[1:]), x.dtype)
                uploaded[id(x)] = jax.device_put(np.concatenate([x, pad]), self.device)
        padded = [uploaded[id(x)] for x in inputs]
        valid_R = jax.device_put(np.arange(self.max_rows) < n, self.device)
        logits_RK, exit_R = jax.device_get(self._answer(self._variables, padded, valid_R))
        return logits_RK[:n], exit_R[:n]


def request_latency(serve, images, *, requests: int = 200, max_rows: int = 8, seed: int = 0):
    """Milliseconds per request of `serve` (a callable on [n, H, W, 3], e.g. an
    `OnlineCascade`), over `requests` requests of uniformly random sizes 1..max_rows drawn from
    `images`, after one warm-up request of each size.

    Returns:
      ``{"p50_ms", "p99_ms", "mean_ms", "requests"}``.
    """
    rng = np.random.default_rng(seed)
    images = np.asarray(images)
    for n in range(1, max_rows + 1):  # compile and warm every padded shape
        jax.block_until_ready(serve(images[:n]))
    times = []
    for _ in range(requests):
        n = int(rng.integers(1, max_rows + 1))
        start = int(rng.integers(0, len(images) - n + 1))
        tick = time.perf_counter()
        jax.block_until_ready(serve(images[start : start + n]))
        times.append(1e3 * (time.perf_counter() - tick))
    times_ms = np.asarray(times)
    return {
        "p50_ms": float(np.percentile(times_ms, 50)),
        "p99_ms": float(np.percentile(times_ms, 99)),
        "mean_ms": float(times_ms.mean()),
        "requests": requests,
    }
