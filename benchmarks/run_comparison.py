"""Runs `digitjax benchmark` over several device counts (each in its own process, since XLA
fixes the number of CPU devices at start-up) and prints a Markdown table of the results.

    python benchmarks/run_comparison.py --devices 1,2,4 --batch-sizes 128,256 --out results/

Each run's full JSON is kept in --out, named by device count, to compare across machines.
"""

import argparse
import json
import os
import subprocess
from pathlib import Path


def run(devices: int, batch_sizes: str, out_dir: Path) -> dict:
    out_file = out_dir / f"benchmark-{devices}dev.json"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    subprocess.run(
        ["digitjax", "benchmark", "--batch-sizes", batch_sizes, "--out", str(out_file), "--json"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(out_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", default="1,2,4", help="CPU device counts to compare")
    parser.add_argument("--batch-sizes", default="128,256")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        "| devices | batch | train img/s (min..max) | GFLOP/s | % of matmul peak "
        "| compile s | eval img/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for devices in (int(n) for n in args.devices.split(",")):
        results = run(devices, args.batch_sizes, args.out)
        for train in results["training"]:
            low, high = train["images_per_s_range"]
            print(
                f"| {devices} | {train['batch_size']} | {train['images_per_s']:,.0f} "
                f"({low:,.0f}..{high:,.0f}) | {train['gflops']:.0f} "
                f"| {100 * train['fraction_of_peak']:.0f}% | {train['compile_s']:.2f} "
                f"| {results['inference']['images_per_s']:,.0f} |"
            )


if __name__ == "__main__":
    main()
