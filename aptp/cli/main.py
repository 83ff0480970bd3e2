"""The ``aptp`` Typer app. Each command lives in its own module and is registered here."""

from __future__ import annotations

import typer

from aptp import __version__
from aptp.cli import evaluate, inspect_experts, inspect_model, prune, run_commands, serve

app = typer.Typer(
    name="aptp",
    help="Adaptive Prompt-Tailored Pruning: prune a text-to-image diffusion U-Net into prompt-routed experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("prune")(prune.prune)
app.command("materialize")(run_commands.materialize)
app.command("route")(run_commands.route)
app.command("finetune")(run_commands.finetune)
app.command("generate")(run_commands.generate)
app.command("eval")(evaluate.evaluate)
app.command("inspect-experts")(inspect_experts.inspect_experts)
app.command("inspect-model")(inspect_model.inspect_model)
app.command("serve")(serve.serve)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"aptp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Adaptive Prompt-Tailored Pruning (APTP) of text-to-image diffusion models."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
