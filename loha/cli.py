"""What the three command lines share (train_loha_sdxl.py, infer.py, python -m loha): one-line usage errors
with argparse's exit status 2, help that states every flag's default once, and the one line of an
exception that an error message quotes."""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """Bad flags get one line, not the whole usage text, and exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default once, at the end of its help ("default: …" written in the text is not repeated)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default:" in text or action.default is argparse.SUPPRESS or action.required:
            return text
        if action.default is False:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def parser(description: str, prog: str | None = None) -> Parser:
    return Parser(description=description, formatter_class=HelpFormatter, prog=prog)


def first_line(error: BaseException) -> str:
    """An exception's first line, or its type's name when it says nothing: what a one-line error quotes."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
