"""`make demo`: run every API-format example (example_workflows/api/*.json) headless through
ComfyUI's real executor on the tiny models; images and report.md go to out/."""

import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    from lumina_turbo.devtools.harness import ComfyHost, install_tiny_models

    install_tiny_models()
    out = REPO / "out"
    out.mkdir(exist_ok=True)
    host = ComfyHost(out / "images")
    rows, failed = [], 0
    for path in sorted((REPO / "example_workflows" / "api").glob("*.json")):
        start = time.perf_counter()
        try:
            outputs = host.run(json.loads(path.read_text()))
            # Saved images only (PreviewImage's are temporary files).
            images = [
                img["filename"]
                for out in outputs.values()
                for img in out.get("images", [])
                if img.get("type", "output") == "output"
            ]
            status = f"ok, {len(images)} image(s): " + ", ".join(images)
        except Exception as exc:  # report every workflow, then fail at the end
            failed += 1
            status = f"FAILED: {str(exc)[:300]}"
        rows.append(f"| {path.stem} | {time.perf_counter() - start:.1f} s | {status} |")
        print(rows[-1], flush=True)
    report = ["# make demo", "", "| workflow | time | result |", "|---|---|---|", *rows, ""]
    (out / "report.md").write_text("\n".join(report))
    print(f"\nreport: {out / 'report.md'}; images: {out / 'images'}")
    shutil.rmtree(out / "images" / "temp", ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
