"""The --help layout of every `avs-dist` command: the description as written, and each
option's default where it has one worth showing.

argparse's ArgumentDefaultsHelpFormatter appends "(default: None)" to options whose default
is "not given" and repeats a default the help text already explains; this one shows the
default only when it is a value (not None / False / an empty list) and the help does not
already say "default".
"""
from __future__ import annotations

import argparse
import copy


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    return not (not action.option_strings or action.required or "default" in (action.help or "").lower()
                or default is None or default is False or default == [] or default is argparse.SUPPRESS
                or action.help is argparse.SUPPRESS)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _shows_default(action):  # argparse lists such an option bare
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not _shows_default(action):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"
