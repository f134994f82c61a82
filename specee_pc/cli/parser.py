"""The subcommands' argument parser."""
import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, with a bad value, an unknown flag or a missing argument said in one line and
    exit code 1, as every other error of specee-pc's commands."""

    def error(self, message: str):
        self.exit(1, f"{self.prog}: error: {message} (see --help)\n")
