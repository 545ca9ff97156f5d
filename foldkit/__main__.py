"""`python -m foldkit ...`: the same command line as the `foldkit` script."""

from .entry import run

if __name__ == "__main__":
    run(prog_name="foldkit")
