"""Model soups: uniform, greedy and learned averages, the ingredient rules, and SSF folding."""

import json
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_classifier import init_tiny, random_variables

import jaxmodels
from jaxmodels.models.ssf import fold, is_ssf_path
from training import check_ingredients, greedy, learned, recompute_batch_stats, uniform
from training.soups import merges


def _ingredients(n=5, seed=0):
    """Trees with leaves over many decades, a signed leaf, a bfloat16 leaf and an int counter."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        decades = 10.0 ** rng.uniform(-15, 20, (4, 6))
        out.append(
            {
                "params": {
                    "dense": {"kernel": decades.astype(np.float32), "bias": rng.normal(size=6)},
                    "tiny": (1e-15 * rng.normal(size=(3,))).astype(np.float32),
                    "half": jnp.asarray(rng.normal(size=(64,)), jnp.bfloat16),
                },
                "step": np.int32(7),
            }
        )
        out[-1]["params"]["dense"]["bias"] = out[-1]["params"]["dense"]["bias"].astype(np.float32)
    return out


def _float64_mean(trees, path):
    leaves = []
    for tree in trees:
        node = tree
        for key in path:
            node = node[key]
        leaves.append(np.asarray(node, np.float64))
    return np.mean(leaves, axis=0), np.mean(np.abs(leaves), axis=0)


# ------------------------------------------------------------------ uniform


def test_uniform_is_the_arithmetic_mean_in_float32_with_dtypes_and_int_leaves_kept():
    trees = _ingredients()
    soup = uniform(trees)
    for path, rtol in [
        (("params", "dense", "kernel"), 4e-7),
        (("params", "dense", "bias"), 4e-7),
        (("params", "tiny"), 4e-7),
    ]:
        expected, scale = _float64_mean(trees, path)
        got = soup
        for key in path:
            got = got[key]
        assert got.dtype == jnp.float32
        # float32 sum of 5 terms: error within a few ulps of the mean of |x|, entry by entry
        # (signed leaves cancel, so relative to the mean itself it can be larger)
        error = np.abs(np.asarray(got, np.float64) - expected)
        assert np.all(error <= rtol * scale), (path, (error / scale).max())
    half_expected, _ = _float64_mean(trees, ("params", "half"))
    assert soup["params"]["half"].dtype == jnp.bfloat16
    # summed in float32, rounded once to bfloat16: the correctly rounded mean (a bfloat16 sum
    # would be off by several bfloat16 ulps)
    np.testing.assert_array_equal(
        np.asarray(soup["params"]["half"]), np.asarray(jnp.asarray(half_expected, jnp.bfloat16))
    )
    assert soup["step"].dtype == np.int32 and int(soup["step"]) == 7


def test_uniform_streamed_equals_in_memory_and_reads_each_loader_once():
    trees = _ingredients()
    calls = [0] * len(trees)

    def loader(i):
        def load():
            calls[i] += 1
            return trees[i]

        return load

    streamed = uniform([loader(i) for i in range(len(trees))])
    chex.assert_trees_all_equal(streamed, uniform(trees))
    assert calls == [1] * len(trees)
    # host (NumPy) leaves are added one leaf at a time, device leaves in one call: same numbers
    chex.assert_trees_all_equal(streamed, uniform([jax.device_put(t) for t in trees]))


def test_uniform_of_one_ingredient_is_that_ingredient():
    tree = _ingredients(1)[0]
    chex.assert_trees_all_equal(uniform([tree]), jax.tree.map(jnp.asarray, tree))


def _method(name):
    """Each method as a function of a list of ingredients (for the shared mismatch checks)."""
    evaluate = lambda v: 0.0
    loss = lambda v, batch: sum(jnp.sum(x) for x in jax.tree.leaves(v) if x.dtype != jnp.int32)
    return {
        "uniform": uniform,
        "greedy": lambda trees: greedy(trees, evaluate),
        "learned": lambda trees: learned(trees, loss, [0], max_bytes=10**9, epochs=1),
        "interpolate": lambda trees: merges.interpolate(trees[0], trees[1], 0.5),
        "task_arithmetic": lambda trees: merges.task_arithmetic(trees[0], trees[1:], 1.0),
        "ties": lambda trees: merges.ties(trees[0], trees[1:]),
        "dare": lambda trees: merges.dare(trees[0], trees[1:], seed=0),
    }[name]


METHODS = ["uniform", "greedy", "learned", "interpolate", "task_arithmetic", "ties", "dare"]


def _edit(tree, edit):
    tree = jax.tree.map(lambda x: x, tree)
    edit(tree)
    return tree


MISMATCHES = {
    "missing leaf": (
        lambda t: t["params"]["dense"].pop("bias"),
        r"at \['params'\]\['dense'\]\['bias'\]: present in \w+(\[0\])?, missing",
    ),
    "extra leaf": (
        lambda t: t["params"].update(extra=np.zeros(2, np.float32)),
        r"at \['params'\]\['extra'\]: present in \w+\[[01]\]|present in b,",
    ),
    "shape": (
        lambda t: t["params"].update(tiny=np.zeros(4, np.float32)),
        r"\['params'\]\['tiny'\]: float32\[4\] vs float32\[3\]",
    ),
    "dtype": (
        lambda t: t["params"].update(tiny=np.zeros(3, np.float16)),
        r"\['params'\]\['tiny'\]: float16\[3\] vs float32\[3\]",
    ),
    "integer leaf": (lambda t: t.update(step=np.int32(8)), r"integer leaf \['step'\]"),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mismatch", list(MISMATCHES))
def test_every_method_refuses_mismatched_ingredients_naming_the_path(method, mismatch):
    edit, message = MISMATCHES[mismatch]
    trees = _ingredients(3)
    trees[1] = _edit(trees[1], edit)
    with pytest.raises(ValueError, match=message):
        _method(method)(trees)


def test_mismatch_messages_for_containers_empty_lists_and_non_arrays():
    trees = _ingredients(2)
    frozen = dict(trees[1], params=tuple(trees[1]["params"].items()))
    with pytest.raises(ValueError, match="ingredients\\[1\\]"):
        uniform([trees[0], frozen])
    with pytest.raises(ValueError, match="at least 1"):
        uniform([])
    with pytest.raises(TypeError, match="list of ingredients"):
        uniform(trees[0])
    with pytest.raises(TypeError, match=r"leaf \['w'\] must be an array; got float"):
        uniform([{"w": 1.0}])


# ------------------------------------------------------------------ greedy


def _plateau(variables):
    """min(w, 1): a score with a plateau, so that candidates can tie the soup."""
    return float(min(float(variables["w"][0]), 1.0))


# w: 3 → score 1, 1 → 1, -1 → -1, -10 → -10. Caller's order shuffled: [C, D, A, B].
PLATEAU = {"A": 3.0, "B": 1.0, "C": -1.0, "D": -10.0}
CALLER_ORDER = ["C", "D", "A", "B"]


@pytest.mark.parametrize(
    "accept, members, soup_w, candidates",
    [
        # ">=": A; A+B = 2 → 1 (tie, kept); (4-1)/3 = 1 → 1 (tie, kept); (3-10)/4 → -1.75 (drop)
        (">=", ["A", "B", "C"], 1.0, [1.0, 1.0, 1.0, -1.75]),
        # ">": A; A+B = 2 → 1 (tie, refused); (3-1)/2 = 1 → 1 (refused); (3-10)/2 → -3.5
        (">", ["A"], 3.0, [1.0, 1.0, 1.0, -3.5]),
    ],
)
def test_greedy_follows_each_acceptance_rule(accept, members, soup_w, candidates):
    trees = [{"w": np.asarray([PLATEAU[k]], np.float32)} for k in CALLER_ORDER]
    calls = [0] * len(trees)

    def loader(i):
        def load():
            calls[i] += 1
            return trees[i]

        return load

    evaluations = []
    evaluate = lambda v: evaluations.append(1) or _plateau(v)
    soup, report = greedy([loader(i) for i in range(len(trees))], evaluate, accept=accept)
    index = {k: CALLER_ORDER.index(k) for k in PLATEAU}
    assert report.scores == (-1.0, -10.0, 1.0, 1.0)
    assert report.order == (index["A"], index["B"], index["C"], index["D"])
    assert report.accepted == tuple(index[k] for k in members)
    assert report.candidate_scores == tuple(candidates)
    assert list(report.soup_scores) == list(np.maximum.accumulate([1.0, *candidates[1:]]))
    np.testing.assert_array_equal(np.asarray(soup["w"]), [soup_w])
    # every ingredient read twice (scored, then tried): never re-read once accepted
    assert calls == [2, 2, 2, 2] and len(evaluations) == 2 * len(trees) - 1
    assert json.loads(json.dumps(report._asdict()))["accepted"] == list(report.accepted)


def test_greedy_soup_is_the_mean_of_its_members_and_its_last_score_is_its_own():
    trees = _ingredients(4, seed=3)
    # a score that rewards closeness to ingredient 2 and its neighbours
    target = trees[2]["params"]["dense"]["bias"]
    score = lambda v: -float(np.sum((np.asarray(v["params"]["dense"]["bias"]) - target) ** 2))
    soup, report = greedy(trees, score)
    members = [trees[i] for i in report.accepted]
    chex.assert_trees_all_close(soup, uniform(members), rtol=1e-6)
    assert score(soup) == report.soup_scores[-1]
    assert report.accepted[0] == 2


@pytest.mark.parametrize("accept", [">=", ">"])
def test_greedy_with_known_scores_reads_each_ingredient_once_and_scores_only_candidates(accept):
    trees = [{"w": np.asarray([PLATEAU[k]], np.float32)} for k in CALLER_ORDER]
    calls, evaluated = [0] * len(trees), []

    def loader(i):
        return lambda: calls.__setitem__(i, calls[i] + 1) or trees[i]

    evaluate = lambda v: evaluated.append(float(v["w"][0])) or _plateau(v)
    known = [min(PLATEAU[k], 1.0) for k in CALLER_ORDER]  # the plateau score, written out
    soup, report = greedy([loader(i) for i in range(4)], evaluate, accept=accept, scores=known)
    expected_soup, expected = greedy(trees, _plateau, accept=accept)
    assert report == expected
    np.testing.assert_array_equal(np.asarray(soup["w"]), np.asarray(expected_soup["w"]))
    assert calls == [1, 1, 1, 1] and len(evaluated) == len(trees) - 1
    assert 3.0 not in evaluated  # the best ingredient alone is never evaluated again
    # the given scores decide the order, whatever evaluate would say of the ingredients alone
    _, flipped = greedy(trees, _plateau, accept=accept, scores=[5.0, 0.0, 1.0, 2.0])
    assert flipped.order == (0, 3, 2, 1) and flipped.accepted[0] == 0
    assert flipped.scores == (5.0, 0.0, 1.0, 2.0)


def test_greedy_rejects_bad_rules_and_scores():
    trees = _ingredients(2)
    with pytest.raises(ValueError, match="accept must be one of"):
        greedy(trees, lambda v: 0.0, accept=">>")
    with pytest.raises(ValueError, match="finite"):
        greedy(trees, lambda v: float("nan"))
    with pytest.raises(TypeError, match="must return a number"):
        greedy(trees, lambda v: "good")
    with pytest.raises(ValueError, match=r"one score per ingredient \(2\); got 3"):
        greedy(trees, lambda v: 0.0, scores=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"scores\[1\] is inf"):
        greedy(trees, lambda v: 0.0, scores=[1.0, float("inf")])
    with pytest.raises(TypeError, match=r"scores\[0\] must be a number; got str"):
        greedy(trees, lambda v: 0.0, scores=["high", 1.0])
    with pytest.raises(TypeError, match="scores must be a list"):
        greedy(trees, lambda v: 0.0, scores=1.0)


# ------------------------------------------------------------------ learned


def _regression(seed=0):
    rng = np.random.default_rng(seed)
    x_ND = rng.normal(size=(64, 4)).astype(np.float32)
    w_D = np.asarray([1.0, -2.0, 0.5, 3.0], np.float32)
    y_N = x_ND @ w_D + 1.5
    batches = [(x_ND[i : i + 16], y_N[i : i + 16]) for i in range(0, 64, 16)]
    loss = lambda v, batch: jnp.mean((batch[0] @ v["w"] + v["b"] - batch[1]) ** 2)
    return w_D, batches, loss


def test_learned_weights_move_toward_the_better_ingredient():
    w_D, batches, loss = _regression()
    good = {"w": w_D, "b": np.float32(1.5)}
    bad = {"w": -w_D, "b": np.float32(-1.5)}
    soup, report = learned([bad, good], loss, batches, max_bytes=10**6)
    assert report.weights[1] > 0.8 and abs(sum(report.weights) - 1) < 1e-6
    assert report.losses[-1] < report.losses[0] / 4
    expected = report.weights[0] * (-w_D) + report.weights[1] * w_D
    np.testing.assert_allclose(np.asarray(soup["w"]), expected, rtol=1e-5)
    json.dumps(report._asdict())


def test_learned_by_layer_mixes_each_tensor_on_its_own():
    w_D, batches, loss = _regression()
    right_w = {"w": w_D, "b": np.float32(-4.0)}
    right_b = {"w": -w_D, "b": np.float32(1.5)}
    _, report = learned(
        [right_w, right_b], loss, batches, max_bytes=10**6, by_layer=True, epochs=20
    )
    assert report.weights["['w']"][0] > 0.8
    assert report.weights["['b']"][1] > 0.8
    _, single = learned([right_w, right_b], loss, batches, max_bytes=10**6, epochs=20)
    assert report.losses[-1] < single.losses[-1]


def test_learned_refuses_above_max_bytes_and_one_shot_iterators():
    w_D, batches, loss = _regression()
    trees = [{"w": w_D, "b": np.float32(0.0)}] * 3
    with pytest.raises(ValueError, match=r"all 3 ingredients in memory: 0.0 MB .* max_bytes"):
        learned(trees, loss, batches, max_bytes=59)
    learned(trees, loss, batches, max_bytes=60, epochs=1)  # 3 × 5 floats × 4 bytes
    with pytest.raises(ValueError, match="epoch 1"):
        learned(trees, loss, iter(batches), max_bytes=60, epochs=2)
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        learned(trees, loss, batches, max_bytes=0)


# ------------------------------------------------------------------ run-level checks


def _info(**change):
    base = {"name": "vit_tiny", "overrides": {}, "base_checkpoint_sha256": "b" * 64}
    return {**base, "start_sha256": "s" * 64, **change}


def test_check_ingredients_refuses_mixed_runs_unless_allowed():
    for change, what in [
        ({"name": "resnet_tiny"}, "architecture"),
        ({"overrides": {"width": 16}}, "architecture overrides"),
        ({"base_checkpoint_sha256": "c" * 64}, "base checkpoint"),
        ({"base_checkpoint_sha256": None}, "base checkpoint"),
    ]:
        with pytest.raises(ValueError, match=f"ingredients 0 and 2 have different {what}"):
            check_ingredients([_info(), _info(), _info(**change)])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_ingredients([_info(), _info(**change)], allow_mixed=True)
    with pytest.raises(ValueError, match=r"infos\[1\] lacks \['start_sha256'\]"):
        check_ingredients([_info(), {k: v for k, v in _info().items() if k != "start_sha256"}])
    with pytest.raises(ValueError, match="at least one"):
        check_ingredients([])


def test_check_ingredients_warns_with_the_lp_ft_recipe_when_starts_differ():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_ingredients([_info(), _info(), _info()])
        check_ingredients([_info(start_sha256=None)])
    for other in ("t" * 64, None):
        with pytest.warns(UserWarning, match=r"LP-FT: --model NAME=LP_RUN/model") as record:
            check_ingredients([_info(), _info(start_sha256=other)])
        assert len(record) == 1 and "ingredient" in str(record[0].message)


# ------------------------------------------------------------------ SSF folding is linear


def _ssf_runs(name, n, vary_frozen, seed=0):
    """n SSF runs of one model: random γ, β and head; frozen weights shared unless asked."""
    model = jaxmodels.create(name, num_classes=5, ssf=True)
    base = random_variables(model, image_size=32, seed=seed)
    head = "fc" if name.startswith("resnet") else "head"
    rng = np.random.default_rng(seed + 1)

    def run(path, leaf):
        keys = [str(k.key) for k in path]
        if is_ssf_path(path):
            centre = 1.0 if keys[-1] == "scale" else 0.0
            return jnp.asarray(centre + 0.3 * rng.normal(size=leaf.shape), leaf.dtype)
        if keys[1] == head or (vary_frozen and keys[0] == "params"):
            return jnp.asarray(0.3 * rng.normal(size=leaf.shape), leaf.dtype)
        return leaf

    return [jax.tree_util.tree_map_with_path(run, base) for _ in range(n)]


@pytest.mark.parametrize("name", ["vit_tiny", "resnet_tiny"])
def test_average_of_folded_ssf_runs_is_the_folded_average_when_frozen_weights_are_shared(name):
    # fold: kernel·γ, γ·bias + β, γ·scale: linear in (γ, β) for fixed frozen weights, and the
    # head (trained, never folded) is averaged either way.
    runs = _ssf_runs(name, 3, vary_frozen=False)
    chex.assert_trees_all_close(
        uniform([fold(v) for v in runs]), fold(uniform(runs)), rtol=2e-6, atol=2e-6
    )


def test_folding_and_averaging_differ_by_the_covariance_when_kernels_vary():
    # avg_i(k_i γ_i) − avg(k)·avg(γ) = avg_i((k_i − k̄)(γ_i − γ̄)): zero only if k or γ is shared
    runs = _ssf_runs("vit_tiny", 3, vary_frozen=True)
    mlp = lambda tree: tree["params"]["Transformer"]["encoderblock_0"]["MlpBlock_3"]
    k_NIO = np.stack([np.asarray(mlp(v)["Dense_0"]["kernel"], np.float64) for v in runs])
    g_NO = np.stack([np.asarray(mlp(v)["ssf_Dense_0"]["scale"], np.float64) for v in runs])
    covariance_IO = np.mean((k_NIO - k_NIO.mean(0)) * (g_NO - g_NO.mean(0))[:, None, :], axis=0)
    difference_IO = np.asarray(
        mlp(uniform([fold(v) for v in runs]))["Dense_0"]["kernel"], np.float64
    ) - np.asarray(mlp(fold(uniform(runs)))["Dense_0"]["kernel"], np.float64)
    assert np.abs(covariance_IO).max() > 1e-2
    np.testing.assert_allclose(difference_IO, covariance_IO, atol=1e-6)


# ------------------------------------------------------------------ a real task


def _blobs(seed, n, noise):
    """Separable 8×8 colour images, 3 classes: a class colour plus pixel noise."""
    rng = np.random.default_rng(seed)
    colours = np.asarray([[1, -1, 0], [-1, 1, 0], [0, 0.2, 1]], np.float32)
    labels = rng.integers(0, 3, n)
    images = colours[labels][:, None, None, :] + noise * rng.normal(size=(n, 8, 8, 3))
    return images.astype(np.float32), labels.astype(np.int32)  # NumPy: slicing compiles nothing


def test_greedy_soup_of_real_fine_tunes_is_at_least_the_best_run():
    model, start = init_tiny(seed=0, batch_norm=True)
    train_x, train_y = _blobs(1, 96, noise=3.5)
    held_x, held_y = _blobs(2, 128, noise=3.5)
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=0.01)

    @jax.jit
    def train_step(variables, opt_state, x, y):
        def loss_of(params):
            logits, new = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

        (_, new), grads = jax.value_and_grad(loss_of, has_aux=True)(variables["params"])
        updates, opt_state = optimizer.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return {"params": params, "batch_stats": new["batch_stats"]}, opt_state

    @jax.jit
    def accuracy(variables, x, y):
        return jnp.mean(jnp.argmax(model.apply(variables, x), axis=-1) == y)

    runs = []
    for seed, lr in [(0, 0.003), (1, 0.01), (2, 0.01), (3, 0.03), (4, 0.1)]:
        variables, opt_state = start, optimizer.init(start["params"])
        # a strong float32, as the jitted step hands it back: one compile for every step
        opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        rng = np.random.default_rng(seed)
        for _ in range(30):
            rows = rng.choice(96, 32, replace=False)
            variables, opt_state = train_step(variables, opt_state, train_x[rows], train_y[rows])
        runs.append(variables)

    evaluate = lambda v: float(accuracy(v, held_x, held_y))
    soup, report = greedy(runs, evaluate)
    uniform_soup = uniform(runs)
    recomputed = recompute_batch_stats(model, uniform_soup, [train_x[:48], train_x[48:]])
    print(
        f"\nheld-out accuracy: runs {[round(s, 3) for s in report.scores]}, "
        f"greedy soup {evaluate(soup):.3f} (members {report.accepted}), "
        f"uniform soup {evaluate(uniform_soup):.3f}, "
        f"uniform soup with recomputed BatchNorm {evaluate(recomputed):.3f}"
    )
    assert evaluate(soup) >= max(report.scores)
    assert evaluate(soup) == report.soup_scores[-1]
    assert max(report.scores) < 1.0  # the task is not trivial for the runs


def test_learned_temperature_sharpens_an_underconfident_soup():
    """Both runs rank the classes right but with logits 10× too small: only β can lower the
    loss (the mix is the same model whatever the weights), and it is learned above 1."""
    rng = np.random.default_rng(0)
    x_ND = rng.normal(size=(64, 4)).astype(np.float32)
    w_DC = rng.normal(size=(4, 3)).astype(np.float32)
    y_N = np.argmax(x_ND @ w_DC, axis=1)
    batches = [(x_ND[i : i + 16], y_N[i : i + 16]) for i in range(0, 64, 16)]

    def loss(v, batch, scale=1.0):
        logits = scale * (batch[0] @ v["w"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    runs = [{"w": 0.1 * w_DC}, {"w": 0.1 * w_DC}]
    _, fixed = learned(runs, loss, batches, max_bytes=10**6, epochs=20)
    _, tempered = learned(runs, loss, batches, max_bytes=10**6, epochs=20, learn_temperature=True)
    assert fixed.logit_scale is None and tempered.logit_scale > 2.0
    assert tempered.losses[-1] < 0.8 * fixed.losses[-1]
    json.dumps(tempered._asdict())
