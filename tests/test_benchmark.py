import gc
import json
import math
from pathlib import Path

import jax
import pytest
from helpers import assert_one_line_error
from typer.testing import CliRunner

from digitjax import benchmark
from digitjax.benchmark import (
    CHECKS_PER_EPOCH,
    TIME_TO_ACCURACY_EPOCHS,
    VECTOR_FLAGS,
    BenchmarkPlan,
    allowed_errors,
    make_target_check,
    run_benchmark,
)
from digitjax.cli import app
from digitjax.config import Config
from digitjax.data import load_dataset
from digitjax.distributed import make_mesh
from digitjax.evaluate import EVAL_BATCH
from digitjax.train import prepare_training, run_chunks

runner = CliRunner()


def test_benchmark_measures_everything_it_reports(tiny_mnist, monkeypatch):
    dataset = load_dataset("mnist", tiny_mnist)
    # A high rate and a short warmup: the time to the target is timed over one epoch.
    config = Config(channels=(4, 8), dense=16, epochs=2, learning_rate=1e-2, warmup_epochs=0.1)
    plan = BenchmarkPlan((32, 64), steps=4, repeats=2, target=0.5, baseline=True)
    events: list[str] = []  # full garbage collections, compile caches cleared, set-ups

    def on_collection(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            events.append("full collection")

    def prepare_training_seen(*args, **kwargs):
        events.append("set-up")
        return prepare_training(*args, **kwargs)

    clear_caches = jax.clear_caches

    def clear_caches_seen() -> None:
        events.append("caches cleared")
        clear_caches()

    monkeypatch.setattr(benchmark, "prepare_training", prepare_training_seen)
    monkeypatch.setattr(jax, "clear_caches", clear_caches_seen)
    gc.callbacks.append(on_collection)
    try:
        results = run_benchmark(plan, config=config, dataset=dataset)
    finally:
        gc.callbacks.remove(on_collection)
    # The time to the target, measured last from a cold start, pays for no collection of the
    # earlier measurements' garbage: it is collected before its clock starts.
    assert events[-3:] == ["caches cleared", "full collection", "set-up"]
    assert results["matmul_peak"]["gflops"] > 1
    assert [r["batch_size"] for r in results["training"]] == [32, 64]
    for run in results["training"]:
        assert run["images_per_s"] > 0 and run["compile_s"] > 0
        low, high = run["images_per_s_range"]
        assert low <= run["images_per_s"] <= high
        # A 4-8 channel CNN: thousands of FLOPs per image, far from zero and from a big model.
        assert 1e5 < run["flops_per_image"] < 1e7
        assert 0 < run["fraction_of_peak"] < 1
        assert run["host_fed_baseline"]["images_per_s"] > 0 and run["speedup_over_host_fed"] > 0
    assert results["inference"]["images_per_s"] > 0
    reached = results["time_to_accuracy"]
    assert reached["reached"] and reached["evaluations"][-1]["test_accuracy"] >= 0.5
    # The recipe timed is the one given, its schedule over TIME_TO_ACCURACY_EPOCHS, and says so.
    assert results["config"]["epochs"] == 2
    timed = {**reached["config"], "epochs": 2, "chunks_per_epoch": config.chunks_per_epoch}
    assert timed == results["config"]
    assert reached["config"]["epochs"] == TIME_TO_ACCURACY_EPOCHS
    assert reached["config"]["chunks_per_epoch"] == CHECKS_PER_EPOCH
    machine = results["machine"]
    assert machine["devices"] == 1 and machine["versions"]["jax"]
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "cpu family" in cpuinfo:  # x86 Linux, as here and in CI: the CPU told from its namesakes
        assert machine["cpu_model"].startswith("family ") and machine["cpu"] in cpuinfo
        flags = next(line for line in cpuinfo.splitlines() if line.startswith("flags"))
        assert set(machine["cpu_vector_flags"]) == set(flags.split()) & set(VECTOR_FLAGS)
    json.dumps(results)  # JSON-ready


def test_benchmark_cli_writes_json(tmp_path):
    out_file = tmp_path / "bench.json"
    result = runner.invoke(
        app, ["benchmark", "--steps", "2", "--repeats", "1", "--json", "--out", str(out_file)]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert json.loads(out_file.read_text())["training"][0]["steps"] == 2
    assert printed["inference"]["images"] == 10000


def test_benchmark_rejects_bad_values():
    result = runner.invoke(app, ["benchmark", "--target", "99"])
    assert result.exit_code == 1 and "--target is an accuracy in (0, 1)" in result.stderr
    result = runner.invoke(app, ["benchmark", "--batch-sizes", "0"])
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "'--batch-sizes': takes positive integers")
    result = runner.invoke(app, ["benchmark", "--batch-sizes", "64,100000"])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "--batch-sizes 100000 exceeds the 60000 training images")


def test_target_check_stops_only_when_the_target_is_out_of_reach(tiny_mnist):
    """The time to accuracy's evaluation stops early, yet decides exactly as the whole test
    set's accuracy would: at the boundary, one error more or less flips the answer."""
    dataset = load_dataset("mnist", tiny_mnist)
    setup = prepare_training(Config(channels=(4, 8), dense=16), dataset, make_mesh(1))
    state = setup.init_state()
    params, accuracy = setup.eval_params(state), setup.test_metrics(state).accuracy
    count = len(dataset.test_labels)  # 1,000, of which an untrained model gets ~10% right
    evaluated, errors = make_target_check(setup, dataset, 0.99)(params)
    assert evaluated < count / 2 and errors > allowed_errors(count, 0.99)
    evaluated, errors = make_target_check(setup, dataset, accuracy)(params)
    assert evaluated == count and errors == allowed_errors(count, accuracy)
    assert 1 - errors / count == pytest.approx(accuracy)
    evaluated, errors = make_target_check(setup, dataset, accuracy + 1 / count)(params)
    assert errors > allowed_errors(count, accuracy + 1 / count)


def test_target_check_takes_the_images_last_found_wrong_first(tiny_mnist):
    """Once it has evaluated them, a check takes the images it last found wrong first: a set
    that cannot reach the target stops after as few batches as its errors fill, and one at
    the boundary still ends exactly where the whole set's accuracy does."""
    dataset = load_dataset("mnist", tiny_mnist)
    setup = prepare_training(Config(channels=(4, 8), dense=16, epochs=2), dataset, make_mesh(1))
    *_, (state, _) = run_chunks(setup, setup.init_state(), 0)
    params, accuracy = setup.eval_params(state), setup.test_metrics(state).accuracy
    count = len(dataset.test_labels)
    errors = round((1 - accuracy) * count)
    assert 0 < errors < count - 2 * EVAL_BATCH  # trained enough for the test to tell
    out_of_reach = make_target_check(setup, dataset, accuracy + 1 / count)
    first, second, third = (out_of_reach(params) for _ in range(3))
    assert second == third == (EVAL_BATCH * math.ceil(errors / EVAL_BATCH), errors)
    assert first[1] == errors and first[0] > second[0]  # the fixed order meets them later
    at_the_boundary = make_target_check(setup, dataset, accuracy)
    assert [at_the_boundary(params) for _ in range(2)] == [(count, errors)] * 2


def test_target_check_compiled_ahead_on_its_thread_answers_the_same(tiny_mnist):
    """Compiled while the caller goes on (as time_to_accuracy's first chunk compiles), and
    run on params made after the ones it was shaped on were donated and deleted."""
    dataset = load_dataset("mnist", tiny_mnist)
    setup = prepare_training(Config(channels=(4, 8), dense=16), dataset, make_mesh(1))
    state = setup.init_state()
    accuracy = setup.test_metrics(state).accuracy
    ahead = make_target_check(setup, dataset, accuracy, setup.eval_params(state))
    later = next(run_chunks(setup, state, 0))[0]  # the initial state is donated to it
    assert ahead(setup.eval_params(later)) == make_target_check(setup, dataset, accuracy)(
        setup.eval_params(later)
    )
    fresh = setup.init_state()
    assert ahead(setup.eval_params(fresh)) == (
        len(dataset.test_labels),
        allowed_errors(len(dataset.test_labels), accuracy),
    )
