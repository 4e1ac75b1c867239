"""Execute a notebook top to bottom on the CPU and fail on any cell error.

    python .ci/execute_notebook.py tutorial.ipynb [--write]

With --write the executed notebook (outputs included) is saved back in place.
"""
import argparse
import sys
import time

import nbclient
import nbformat


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebook", help="path of the .ipynb to run")
    p.add_argument("--write", action="store_true", help="save the executed notebook back to its path")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell (default: 900)")
    args = p.parse_args()
    nb = nbformat.read(args.notebook, as_version=4)
    start = time.time()
    client = nbclient.NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                                     resources={"metadata": {"path": "."}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        print(f"{args.notebook}: a cell failed after {time.time() - start:.0f} s\n{err}", file=sys.stderr)
        return 1
    if args.write:
        nbformat.write(nb, args.notebook)
    print(f"{args.notebook}: all {sum(c.cell_type == 'code' for c in nb.cells)} code cells ran "
          f"in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
