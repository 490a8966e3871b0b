import pytest
from helpers import assert_one_line_error, run_digitjax
from typer.testing import CliRunner

from digitjax import __version__
from digitjax.cli import app

runner = CliRunner()
COMMANDS = ("train", "evaluate", "predict", "benchmark", "export", "serve")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_exists_with_help_and_json(command):
    listed = runner.invoke(app, ["--help"])
    assert listed.exit_code == 0 and command in listed.stdout
    help_text = runner.invoke(app, [command, "--help"])
    assert help_text.exit_code == 0
    assert ("--json" in help_text.stdout) == (command != "serve")  # a server prints no document
    # Flags (--json, --help) take no value: Typer's <bool> beside them read as if they did.
    assert "<bool>" not in listed.stdout + help_text.stdout and "[[" not in help_text.stdout


def test_train_help_groups_flags_and_reads_help_from_the_config():
    help_text = runner.invoke(app, ["train", "--help"], terminal_width=120).stdout
    for panel in ("Recipe", "Model", "Augmentation", "Run folder", "Multi-host"):
        assert panel in help_text
    assert "Peak AdamW learning rate." in help_text and "Training epochs. [default: 8]" in help_text


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"digitjax {__version__}"
    [line] = [
        line for line in runner.invoke(app, ["--help"]).stdout.splitlines() if "--version" in line
    ]
    assert "<bool>" not in line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "-1"], "--epochs must be in [1, 100000], got -1"),
        (["--batch-size", "0"], "--batch-size must be in [1, 1000000], got 0"),
        (["--learning-rate", "0"], "--learning-rate must be in"),
        (["--learning-rate", "nan"], "--learning-rate must be in [1e-12, 1000000.0], got nan"),
        (["--weight-decay", "nan"], "--weight-decay must be in"),
        (["--warmup-epochs", "nan"], "--warmup-epochs must be in [0.0, 100000.0], got nan"),
        (["--warmup-epochs", "inf"], "--warmup-epochs must be in [0.0, 100000.0], got inf"),
        (["--warmup-epochs", "100", "--epochs", "1"], "--warmup-epochs 100 is longer than the"),
        (["--seed", "-1"], "--seed must be in [0, 2147483647], got -1"),
        (["--seed", "99999999999999999999999"], "--seed must be in [0, 2147483647]"),
        (["--augment-shift", "1000"], "--augment-shift must be in [0, 13]"),
        (["--augment-rotate", "nan"], "--augment-rotate must be in [0.0, 180.0], got nan"),
        (["--augment-scale", "1e30"], "--augment-scale must be in [0.0, 0.99]"),
        (["--ema-decay", "nan"], "--ema-decay must be in [0, 1), got nan"),
        (["--adam-beta2", "1"], "--adam-beta2 must be in [0, 1), got 1.0"),
        (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
        (["--dataset", "cifar10"], "unknown dataset 'cifar10'; known: mnist, fashion_mnist"),
        (["--data-dir", "/nonexistent/folder"], "data dir /nonexistent/folder does not exist"),
        (["--batch-size", "100000"], "--batch-size 100000 exceeds the 57000 training images"),
        (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
        (["--calibration-fraction", "0.0001"], "holds out 6 of the 60000 training images"),
        (["--calibration-fraction", "0.001"], "fitted on fewer than 100 is noise"),
    ],
)
def test_bad_train_input_is_one_line_and_non_zero(flags, message, tmp_path):
    result = runner.invoke(app, ["train", *flags, "--out", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, message)
    assert not (tmp_path / "run").exists(), "a refused run leaves nothing behind"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--epochs", "abc"], "Invalid value for '--epochs'"),
        (["train", "--channels", "8,x"], "'--channels': takes comma-separated integers, got '8,x'"),
        (["train", "--epoch", "3"], "No such option: --epoch"),
        (["trian"], "No such command 'trian'"),
        (["predict"], "Missing argument"),
        (["train", "--num-processes", "0"], "'--num-processes': Input should be greater than or"),
        (["benchmark", "--batch-sizes", "64,64"], "takes distinct values, got '64,64'"),
    ],
)
def test_flag_errors_read_like_every_other_error(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert_one_line_error(result.stderr, message)
    assert "╭" not in result.stderr and "Usage:" not in result.stderr


def test_no_command_shows_the_help_and_no_empty_error():
    result = runner.invoke(app, [])
    assert result.exit_code == 2
    assert "Usage:" in result.stdout and "train" in result.stdout
    assert result.stderr == ""  # was "error: ; see 'digitjax --help'"


def test_resume_with_nothing_to_resume(tmp_path):
    result = runner.invoke(app, ["train", "--resume", "--out", str(tmp_path / "none")])
    assert_one_line_error(
        result.stderr, "nothing to resume: no checkpoint in", "killed or diverged"
    )


def test_installed_console_script_reports_errors_without_traceback(tmp_path):
    result = run_digitjax("evaluate", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "no checkpoint at")
    result = run_digitjax("train", "--epochs", "abc")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "Invalid value for '--epochs'", "digitjax train --help")
