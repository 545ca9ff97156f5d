"""`python -m foldkit ...`: the same command line as the `foldkit` script."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="foldkit")
