"""The `meshserve` command line: serve, bench, disaggregated."""
from __future__ import annotations

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (a bad flag value, an unknown flag, a missing argument) are one
    line on stderr naming the flag and the value, exit status 2: no usage block (`--help` has it).
    Subparsers made by add_subparsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
