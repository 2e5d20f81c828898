"""Print the figures one hardening run recorded (``python -m tests.hardening.figures FILE``) as a table."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(path: Path) -> str:
    rows = ["| test | figure | value |", "| --- | --- | --- |"]
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        fig = json.loads(line)
        test = fig["test"].split("::")[-1]
        value = f"{fig['value']} {fig.get('unit', '')}".strip()
        rows.append(f"| {test} | {fig['name']} | {value} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "var/hardening-figures.jsonl")))
