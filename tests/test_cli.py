import pytest
from conftest import assert_one_line_error, run_digitjax
from typer.testing import CliRunner

from digitjax.cli import app

runner = CliRunner()


def test_every_command_has_help_and_json():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = [name for name in ("train", "evaluate", "predict", "benchmark")
                if name in result.stdout]
    assert {"train", "evaluate"} <= set(commands)
    for command in commands:
        help_text = runner.invoke(app, [command, "--help"])
        assert help_text.exit_code == 0 and "--json" in help_text.stdout


@pytest.mark.parametrize(("flags", "message"), [
    (["--epochs", "-1"], "--epochs must be > 0, got -1"),
    (["--batch-size", "0"], "--batch-size must be > 0, got 0"),
    (["--learning-rate", "0"], "--learning-rate must be > 0"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
    (["--channels", "8,x"], "--channels takes comma-separated integers"),
    (["--dataset", "cifar10"], "unknown dataset 'cifar10'; known: mnist, fashion_mnist"),
    (["--data-dir", "/nonexistent/folder"], "data dir /nonexistent/folder does not exist"),
    (["--batch-size", "100000"], "--batch-size 100000 exceeds the 60000 training images"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
])
def test_bad_train_input_is_one_line_and_non_zero(flags, message, tmp_path):
    result = runner.invoke(app, ["train", *flags, "--out", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, message)


def test_resume_with_nothing_to_resume(tmp_path):
    result = runner.invoke(app, ["train", "--resume", "--out", str(tmp_path / "none")])
    assert_one_line_error(result.stderr, "nothing to resume")


def test_installed_console_script_reports_errors_without_traceback(tmp_path):
    result = run_digitjax("evaluate", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "no checkpoint at")
    result = run_digitjax("evaluate", cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "no runs in checkpoints/")
