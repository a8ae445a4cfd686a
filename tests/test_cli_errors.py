"""Every hubtune command answers a bad option in one line and exit 2, under its own name
(``hubtune STEP: error: ...``, whether argparse or the command itself finds the fault), and takes
negative numbers as values (so the command itself can say what is wrong with them)."""

import numpy as np
import pytest

from hubtune import cli


def run(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        status = cli.main(argv)
        raise SystemExit(status)
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("step", list(cli.STEPS))
def test_an_unknown_option_is_one_line_and_exit_2(capsys, step):
    code, err = run(capsys, [step, "--no-such-option", "1"])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"hubtune {step}: error: ") and err[0].endswith("(see --help)")


@pytest.mark.parametrize(
    "step, argv, message",
    [
        ("tune", ["--model", "vit_tiny", "--data", "x.npz", "--out", "o", "--lr", "-1e-3"],
         "lr must be > 0.0; got -0.001"),
        ("serve", ["--models", "a", "b", "--heldout", "h", "--test", "t", "--out", "o",
                   "--target-accuracy", "-5E-1"], "target"),
        ("rank", ["--models", "vit_tiny", "--data", "{data}", "--out", "o", "--batch-size",
                  "-8"], "batch size must be a positive multiple"),
        ("soup", ["--runs", "a", "b", "--heldout", "{data}", "--out", "o", "--learned-max-mb",
                  "-1e1"], "run folder 'a' does not exist"),
        ("demo", ["--out", "o", "--seed", "-1"], "--seed must be an integer ≥ 0"),
    ],
)  # fmt: skip
def test_a_negative_number_in_exponent_form_is_a_value(
    capsys, tmp_path, monkeypatch, step, argv, message
):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.npz"
    np.savez(data, images=np.zeros((10, 8, 8, 3), np.uint8), labels=np.arange(10) % 2)
    code, err = run(capsys, [step, *(a.format(data=data) for a in argv)])
    assert code == 2 and len(err) == 1, err
    assert "expected one argument" not in err[0] and message in err[0], err
    assert err[0].startswith(f"hubtune {step}: error: "), err  # the name the user typed
