"""The ``lmpress`` command line: thin Typer commands over the Python API, one module per verb.

    lmpress eval                                  # the built-in model on the built-in corpus
    lmpress eval out/bf16 --reference builtin     # + KL and top-1 agreement vs the original
    lmpress compress -r bf16 -o out/bf16          # a recipe file or preset on the built-in model
    lmpress train-reference --out runs/reference  # retrain the built-in model

Bad input prints one line and exits with code 2; nothing is written.
"""

from __future__ import annotations

import importlib
import sys

from lmpress.cli.common import app, expand_list_options, fail_line, metrics_table

# each module registers its commands; this order is the order `lmpress --help` lists them in
for _verb in ("evaluate", "compress", "imatrix", "inspection", "catalog", "demo", "search"):
    importlib.import_module(f"lmpress.cli.{_verb}")

from lmpress.cli.compress import print_compressed  # noqa: E402
from lmpress.cli.demo import demo_table  # noqa: E402
from lmpress.cli.federated import federated_app  # noqa: E402

app.add_typer(federated_app, name="federated")

__all__ = ["app", "demo_table", "expand_list_options", "main", "metrics_table", "print_compressed", "run"]


def run(argv: list[str]) -> int:
    """Run ``lmpress ARGV``; returns the exit code. A usage error (an unknown option, a missing
    value) is one line on stderr with exit code 2, like every other refusal, not click's usage box."""
    import click

    try:
        code = app(args=expand_list_options(argv), prog_name="lmpress", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # plain `lmpress` or `lmpress federated`
        click.echo(e.ctx.get_help() if e.ctx is not None else "")
        return 0
    except click.UsageError as e:
        command = e.ctx.command_path if e.ctx is not None else "lmpress"
        fail_line(f"{e.format_message().rstrip('.')}; see '{command} --help'")
        return 2
    except click.ClickException as e:
        fail_line(e.format_message())
        return e.exit_code
    except click.Abort:
        fail_line("interrupted; nothing was written")
        return 130
    return code if isinstance(code, int) else 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))
