"""One output-folder rule (hubtune/output.py): no command overwrites or mixes into a result."""

import json
import sys

import pytest

from hubtune import cli, output

SETTINGS = {"models": ["a", "b"], "scores": "logme"}


def test_an_empty_or_missing_folder_is_taken(tmp_path):
    assert output.check(tmp_path / "new", "rank", SETTINGS) is None
    (tmp_path / "empty").mkdir()
    assert output.check(tmp_path / "empty", "rank", SETTINGS) is None


def test_the_same_command_again_is_a_no_op_and_other_settings_are_refused(tmp_path):
    output.mark(tmp_path, "rank", SETTINGS)
    assert output.check(tmp_path, "rank", SETTINGS)["tool"] == "rank"
    with pytest.raises(
        output.OutputError, match=r"other settings \(scores: 'logme' there, 'leep' now\)"
    ):
        output.check(tmp_path, "rank", {**SETTINGS, "scores": "leep"})


def test_a_partial_result_may_be_redone_by_the_same_command_only(tmp_path):
    output.mark(tmp_path, "rank", SETTINGS, complete=False)
    assert output.check(tmp_path, "rank", SETTINGS) is None
    with pytest.raises(output.OutputError, match="other settings"):
        output.check(tmp_path, "rank", {**SETTINGS, "scores": "leep"})


@pytest.mark.parametrize("tool", ["tune", "soup", "serve", "demo"])
def test_another_tools_folder_is_refused(tmp_path, tool):
    output.mark(tmp_path, "rank", SETTINGS)
    with pytest.raises(output.OutputError, match="holds the result of `hubtune rank`"):
        output.check(tmp_path, tool, None)


@pytest.mark.parametrize(
    "files, tool, settings, match",
    [
        (["ranking.json"], "rank", SETTINGS, "holds an earlier result"),  # from before the rule
        (["ranking.json"], "tune", None, "holds the result of `hubtune rank`"),
        (["config.json", "result.json"], "soup", {}, "holds the result of `hubtune tune`"),
        (["notes.txt"], "serve", {}, "holds files hubtune did not write"),
    ],
)
def test_folders_written_before_the_rule_are_recognised(tmp_path, files, tool, settings, match):
    for name in files:
        (tmp_path / name).write_text("{}")
    with pytest.raises(output.OutputError, match=match):
        output.check(tmp_path, tool, settings)


def test_a_run_folder_is_left_to_the_runs_own_rule(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # an unfinished run, to resume
    assert output.check(tmp_path, "tune", None) is None


ARGV = {
    "rank": ["--models", "m", "--data", "d.npz"],
    "tune": ["--model", "vit_tiny", "--data", "d.npz"],
    "soup": ["--runs", "r1", "r2", "--heldout", "d.npz"],
    "serve": ["--models", "a", "b", "--heldout", "d.npz", "--test", "d.npz"],
    "demo": ["--quick"],
}


@pytest.mark.parametrize("step", list(ARGV))
def test_every_command_refuses_another_tools_folder_in_one_line(tmp_path, capsys, step):
    other = "rank" if step == "demo" else "demo"
    output.mark(tmp_path / "o", other, None)
    before = sorted(p.name for p in (tmp_path / "o").iterdir())
    saved = sys.argv[0]
    try:
        code = cli.main([step, *ARGV[step], "--out", str(tmp_path / "o")])
    finally:
        sys.argv[0] = saved
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"holds the result of `hubtune {other}`" in err[0], err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == before
    assert json.loads((tmp_path / "o" / "hubtune.json").read_text())["tool"] == other
