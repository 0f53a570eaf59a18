"""Execute course notebooks in place so that their committed outputs are real and fresh.

  python tools/run_notebooks.py notebooks/03_*.ipynb            full mode (what gets committed)
  python tools/run_notebooks.py --quick notebooks/*.ipynb       STRAWBERRY_QUICK=1, for a fast try

The package is re-exported before each notebook runs, because later notebooks import what
earlier ones export. Timing metadata and widget state are left out so re-runs are byte-stable.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import export  # noqa: E402


def run(path: Path, timeout: int) -> None:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nbformat.write(nb, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--quick", action="store_true", help="set STRAWBERRY_QUICK=1 for the kernels")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args()
    if args.quick:
        os.environ["STRAWBERRY_QUICK"] = "1"
    else:
        os.environ.pop("STRAWBERRY_QUICK", None)
    for path in sorted(args.notebooks):
        export.export(ROOT)
        start = time.time()
        run(path, args.timeout)
        print(f"executed {path} in {time.time() - start:.0f} s", flush=True)
    export.export(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
