"""Compare run folders: curves overlaid, final and best accuracies, mean and spread over seeds.

    python compare.py runs/a runs/b runs/c --out comparison    # comparison.html, comparison.csv
    python compare.py runs/seed* > results.md                  # the Markdown table alone on stdout

Writes one self-contained page (``<out>.html``: the tables and the curves as an
embedded PNG) and ``<out>.csv`` (a row per run, kind ``run``, then a row per
setting of two or more runs, kind ``group``, whose accuracy columns hold the mean
and the _std/_min/_max columns the rest); ``--out`` naming a folder writes
``comparison.html`` and ``comparison.csv`` in it. Both are overwritten. Runs
whose arguments that change the mathematics agree except for the seed form one
setting: its statistics are over seeds, the standard deviation is the sample one
(ddof=1). Accuracies are in percent, ECE is a fraction. stdout gets a Markdown
table, one row per setting, for a README; the names of the files written go to
stderr. best.pt chosen on the test set (no validation split) is marked ``*``.
"""
import sys
import time

from utils.cli import Parser, run_command
from utils.compare import build_html, compare, csv_rows, markdown_table, write_outputs


def build_parser():
    p = Parser(prog="compare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by main.py, one data set")
    p.add_argument("--out", default="comparison",
                   help="where to write: OUT.html and OUT.csv, or a folder to hold comparison.html and .csv")
    return p


def main_command(argv) -> int:
    args = build_parser().parse_args(argv)
    comparison = compare(args.runs)
    page = build_html(comparison, time.strftime("%Y-%m-%d %H:%M:%S"))
    html_path, csv_path = write_outputs(args.out, page, csv_rows(comparison))
    print(markdown_table(comparison), end="")
    print(f"wrote {html_path} and {csv_path}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_command(main_command, argv)


if __name__ == "__main__":
    sys.exit(main())
