"""``lmpress federated serve`` and ``lmpress federated join``: federated recovery across machines.

    lmpress federated serve builtin -r fed.yaml -o out/fed --address 0.0.0.0:9092 --insecure
    lmpress federated join server:9092 --data notes/ --model student/ --teacher teacher/ --insecure

The server runs the recipe's stages, saves the compressed model and the teacher for the clients
to copy, starts a Flower SuperLink on ``--address`` and waits for ``min_clients`` SuperNodes;
each client runs ``join`` with its own text, which never leaves it. For a run on one machine,
``lmpress compress -r fed.yaml --clients a/ b/ c/`` starts everything on loopback instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmpress.cli.common import (
    DataOpt,
    ModelArg,
    RunFlags,
    WindowsOpt,
    _data_options,
    _setup,
    handles_errors,
    option_groups,
)
from lmpress.cli.compress import print_compressed
from lmpress.errors import LmpressError
from lmpress.federated.local import join, parse_address
from lmpress.federated.stage import Serve
from lmpress.recipe import load_recipe
from lmpress.track import tracked_compress

federated_app = typer.Typer(
    help="Federated recovery across machines: serve a federation, or join one with local text.",
    no_args_is_help=True,
)

InsecureOpt = Annotated[bool, typer.Option("--insecure", help="plain connections without TLS (a trusted network only)")]


def _tls(insecure: bool, certificates: Path | None) -> Path | None:
    if insecure == (certificates is not None):
        raise LmpressError(
            "choose --insecure (no TLS, a trusted network only) or --certificates DIR (TLS), exactly one"
        )
    return certificates


@federated_app.command("serve")
@handles_errors
@option_groups
def serve_cmd(
    model: ModelArg = "builtin",
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="recipe YAML with a federated stage")] = ...,  # type: ignore[assignment]
    output: Annotated[Path, typer.Option("--output", "-o", help="directory to write the result to")] = ...,  # type: ignore[assignment]
    address: Annotated[str, typer.Option("--address", help="HOST:PORT the clients connect to")] = "0.0.0.0:9092",
    insecure: InsecureOpt = False,
    certificates: Annotated[
        Path | None, typer.Option("--certificates", help="TLS: a directory with ca.crt, server.pem, server.key")
    ] = None,
    wait: Annotated[float, typer.Option("--wait", min=1, help="seconds to wait for min_clients to join")] = 600.0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty output directory")] = False,
    data: DataOpt = "stdlib",
    max_windows: WindowsOpt = None,
    run_eval: Annotated[bool, typer.Option("--eval/--no-eval", help="evaluate against the original")] = True,
    *,
    run: RunFlags,
) -> None:
    """Run a recipe whose federated stage trains on clients that join from other machines.

    Prints where the compressed model and the teacher are for the clients to copy, and the join
    command; a restarted server resumes after its last completed round (same -o, same recipe)."""
    run.setup()
    host, port = parse_address(address)
    certs = _tls(insecure, certificates)
    parsed = load_recipe(recipe)
    if not any(s.method == "federated" for s in parsed.stages):
        raise LmpressError(f"recipe {recipe} has no federated stage; add one (see docs/recipes.md)")
    result, run_dir = tracked_compress(
        run.tracking(),
        model,
        parsed,
        _data_options(data, "**/*", "text", eval_windows=max_windows),
        output=output,
        overwrite=overwrite,
        run_eval=run_eval,
        measure_speed=False,
        progress=run.progress,
        serve=Serve(host, port, certs, wait),
    )
    print_compressed(result, run_dir, None, run.as_json)


@federated_app.command("join")
@handles_errors
def join_cmd(
    address: Annotated[str, typer.Argument(help="the server's HOST:PORT")],
    data: Annotated[Path, typer.Option("--data", help="this client's text (a directory); it never leaves")],
    model: Annotated[Path, typer.Option("--model", help="the compressed model the server wrote (a copy)")],
    teacher: Annotated[Path, typer.Option("--teacher", help="the teacher the server wrote (a copy)")],
    name: Annotated[
        str | None, typer.Option("--name", help="this client's name in the rounds [default: data dir]")
    ] = None,
    insecure: InsecureOpt = False,
    certificates: Annotated[
        Path | None, typer.Option("--certificates", help="TLS: a directory with the server's ca.crt")
    ] = None,
    threads: Annotated[int, typer.Option("--threads", min=1, help="CPU threads for local training")] = 1,
) -> None:
    """Join a federation with this machine's text: train locally each round, send back only the
    trainable parameters. Runs until interrupted (Ctrl-C); one node can serve several federations."""
    _setup(threads)
    certs = _tls(insecure, certificates)
    code = join(address, data, model, teacher, name or data.resolve().name, certs, threads)
    raise typer.Exit(code)
