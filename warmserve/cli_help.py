"""Help texts and version of the command line."""

from __future__ import annotations

import argparse
import importlib.metadata

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none or the help already says it
    (a default read from the environment, such as an API key, is never printed)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def warmserve_version() -> str:
    try:
        return importlib.metadata.version("warmserve")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown (not installed)"
