"""Fail if a committed notebook has an unexecuted code cell, an error output, or cells run out
of order. nbval's strict mode silently passes cells that were never executed, so CI runs this."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent


def problems(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    found, last = [], 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        count = cell.get("execution_count")
        if count is None:
            found.append(f"cell {index}: never executed")
            continue
        if count <= last:
            found.append(f"cell {index}: executed out of order (run the notebook top to bottom)")
        last = count
        if any(out.get("output_type") == "error" for out in cell.get("outputs", [])):
            found.append(f"cell {index}: has an error output")
    return found


def main(paths: list[str]) -> int:
    notebooks = [Path(p) for p in paths] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    bad = {p: problems(p) for p in notebooks}
    bad = {p: msgs for p, msgs in bad.items() if msgs}
    for path, msgs in bad.items():
        print(f"{path}:\n  " + "\n  ".join(msgs), file=sys.stderr)
    if bad:
        print("Re-run them with `python tools/run_notebooks.py <notebook>` and commit.", file=sys.stderr)
        return 1
    print(f"notebook check: {len(notebooks)} notebooks fully executed, in order, without errors")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
