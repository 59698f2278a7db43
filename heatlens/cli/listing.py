"""``heatlens methods`` and ``heatlens layers``: what can be explained, and where."""

from __future__ import annotations

import click

from heatlens.cli.common import ModelSpec, model_options, reported


@click.command("methods")
def methods() -> None:
    """List the explanation methods: name, aliases and what each computes."""
    from heatlens.methods.registry import list_methods, method_info

    rows = []
    for name in list_methods():
        info = method_info(name)
        aliases = f" ({', '.join(info.aliases)})" if info.aliases else ""
        rows.append((name + aliases, info.summary))
    width = max(len(left) for left, _ in rows)
    for left, summary in rows:
        click.echo(f"{left:<{width}}  {summary}")


@click.command("layers")
@model_options
@click.option("--size", type=click.IntRange(min=1), default=None,
              help="Side of the square probe input [default: the model's input size].")
def layers(spec: ModelSpec, size: int | None) -> None:
    """List the layers that output spatial feature maps, marking the automatic choice (*).

    A layer that the model passes through a functional activation before anything else reads
    it (DenseNet's F.relu after features.norm5) is explained after that activation, as the
    rest of the network reads it; the last column says so."""
    import torch

    from heatlens.engine.layers import auto_layer, candidate_layers

    with reported():
        loaded = spec.load()
        side = size or loaded.preset.crop
        probe = torch.zeros(1, 3, side, side, device=spec.device)
        candidates = candidate_layers(loaded.model, probe)
        chosen, reason = auto_layer(loaded.model, probe)
    click.echo(f"model: {loaded.name}, input (1, 3, {side}, {side})")
    table = [("", "LAYER", "TYPE", "OUTPUT", "")] + [
        ("*" if c.name == chosen else "" if c.output_depends else "-", c.name, c.module_type,
         str(c.shape), f"then {c.followed_by}" if c.followed_by else "")
        for c in candidates
    ]
    widths = [max(len(row[column]) for row in table) for column in range(4)]
    for *cells, follower in table:
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + "  " + follower
        click.echo(line.rstrip())
    followed = next((c.followed_by for c in candidates if c.name == chosen and c.followed_by), "")
    click.echo(f"* automatic choice: {reason}"
               + (f"; explained after {followed}, as the rest of the network reads it"
                  if followed else ""))
    if not all(c.output_depends for c in candidates):
        click.echo("- the model's output does not depend on this layer")
