"""docs/training-options.md, the table of every trainer option, generated from training/options.py.

.venv/bin/python -m lumina_turbo.devtools.options_table          # print it
.venv/bin/python -m lumina_turbo.devtools.options_table --write  # rewrite docs/training-options.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..training import options
from ..training.config import ALIASES, LOSS_PARAM_NAMES

DOC = Path(__file__).resolve().parents[1] / "docs" / "training-options.md"
HEADER = """# Trainer options

Every option of the AC-RF LoRA trainer: the TOML key (with the AC-RF trainer's own spelling in
brackets), its section(s), valid values, default, and where the nodes show it. Options marked
"`advanced` box" are set on LTLoraTrainer as TOML `key = value` lines; "CLI only" ones only in the
headless trainer's TOML. Generated from `training/options.py` by
`.venv/bin/python -m lumina_turbo.devtools.options_table --write`; a test keeps it current.

"""


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def table() -> str:
    aliases = {}
    for alias, name in ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    rows = [
        "| TOML key | section | value | default | node input | what it does |",
        "|---|---|---|---|---|---|",
    ]
    for name in options.toml_options():
        field, extra = options.fields()[name], options.extra(name)
        key = f"`{name}`" + "".join(f" (`{a}`)" for a in aliases.get(name, []))
        node = (
            f"{extra['node']} `{options.widget_name(name)}`"
            if extra.get("node")
            else ("CLI only" if extra.get("headless") else "`advanced` box")
        )
        default = f"`{json.dumps(field.default)}`"
        rows.append(
            f"| {key} | {', '.join(f'[{s}]' for s in extra['sections'])} | {_cell(options.expected(name))} "
            f"| {_cell(default)} | {node} | {_cell(field.description)} |"
        )
    params = ", ".join(f"`{name}`" for name in LOSS_PARAM_NAMES)
    rows.append(f"\nLoss-mode parameters ([loss] or [training], `advanced` box): {params}.")
    return "\n".join(rows)


def document() -> str:
    return HEADER + table() + "\n"


if __name__ == "__main__":
    if "--write" in sys.argv:
        DOC.write_text(document())
    else:
        print(document())
