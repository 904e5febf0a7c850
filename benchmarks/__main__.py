"""`make bench`: run every benchmarks/bench_*.py, write benchmarks/results/<name>.json, print tables.

Each bench module defines ``run() -> dict`` returning ``{"table": <markdown str>, ...numbers}``.
Usage: python -m benchmarks [NAME ...]   (names without the bench_ prefix; default: all)
"""

import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(names: list[str]) -> int:
    available = sorted(p.stem[len("bench_") :] for p in HERE.glob("bench_*.py"))
    unknown = sorted(set(names) - set(available))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available}", file=sys.stderr)
        return 2
    (HERE / "results").mkdir(exist_ok=True)
    for name in names or available:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        start = time.perf_counter()
        result = module.run()
        result["wall_seconds"] = round(time.perf_counter() - start, 2)
        out = HERE / "results" / f"{name}.json"
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(out)
        print(f"\n## {name}  ({result['wall_seconds']} s, {out.relative_to(HERE.parent)})\n")
        print(result.get("table", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
