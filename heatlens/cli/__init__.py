"""The ``heatlens`` command: explain images or a whole folder, compare methods, find concepts,
list methods and layers.

``heatlens explain`` with no arguments explains the packaged sample photo with the default model
(EfficientNet-Lite0, ImageNet), offline. Bad input (a missing or unreadable file, an unknown
architecture or method, a class out of range, ...) ends with a one-line ``Error: ...`` message and
exit code 1 instead of a traceback; anything else, a bug, keeps its traceback.

The command modules import only click at start-up (torch, torchvision and matplotlib load when a
command does its work), so ``heatlens --help`` and ``heatlens methods`` answer at once.
"""

from __future__ import annotations

import warnings

import click

from heatlens import __version__
from heatlens.cli.audit import audit
from heatlens.cli.compare import compare
from heatlens.cli.concepts import concepts
from heatlens.cli.dataset import explain_dir
from heatlens.cli.explain import explain
from heatlens.cli.listing import layers, methods
from heatlens.cli.serve import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="heatlens")
@click.pass_context
def main(context: click.Context) -> None:
    """Why did the vision model say that? Class activation maps and attributions for vision
    models."""
    before = warnings.formatwarning
    warnings.formatwarning = _one_line
    context.call_on_close(lambda: setattr(warnings, "formatwarning", before))


def _one_line(message: Warning | str, category: type[Warning], *args: object,
              **kwargs: object) -> str:
    """A warning on the command line: ``Warning: ...`` on one line, no source line."""
    return f"Warning: {' '.join(str(message).split())}\n"


for command in (explain, explain_dir, compare, audit, concepts, serve, methods, layers):
    main.add_command(command)
