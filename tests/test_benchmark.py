import json

from helpers import assert_one_line_error
from typer.testing import CliRunner

from digitjax.benchmark import BenchmarkPlan, run_benchmark
from digitjax.cli import app
from digitjax.config import Config
from digitjax.data import load_dataset

runner = CliRunner()


def test_benchmark_measures_everything_it_reports(tiny_mnist):
    dataset = load_dataset("mnist", tiny_mnist)
    config = Config(channels=(4, 8), dense=16, batch_size=64, epochs=2)
    plan = BenchmarkPlan((32, 64), steps=4, repeats=2, target=0.5, baseline=True)
    results = run_benchmark(plan, config=config, dataset=dataset)
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
    assert results["machine"]["devices"] == 1 and results["machine"]["versions"]["jax"]
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
