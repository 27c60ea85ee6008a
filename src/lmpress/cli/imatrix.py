"""``lmpress imatrix``: llama.cpp's importance matrix of a model, from lmpress's calibration pass.

    lmpress imatrix MODEL --data DIR -o model.imatrix      # GGUF form (llama-quantize --imatrix)
    lmpress imatrix MODEL --data DIR -o model.dat          # the legacy form

A Hugging Face directory of safetensors files is read one block at a time (`lmpress.streaming`),
so memory follows one block and the calibration activations, not the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lmpress.api import load
from lmpress.cli.common import (
    CalibOpt,
    DataOpt,
    JsonOpt,
    ModelArg,
    PatternOpt,
    QuietOpt,
    SeqLenOpt,
    TextFieldOpt,
    ThreadsOpt,
    _data_options,
    _print_json,
    _setup,
    app,
    console,
    handles_errors,
    model_dir,
)
from lmpress.errors import OutputError
from lmpress.formats.imatrix import write_imatrix
from lmpress.io import META_FILE
from lmpress.preflight import check_inputs
from lmpress.quant.imatrix import collect_imatrix
from lmpress.streaming import close, open_streamed


@app.command("imatrix")
@handles_errors
def imatrix_cmd(
    model: ModelArg = "builtin",
    output: Annotated[Path, typer.Option("--output", "-o", help="file to write: .dat legacy form, else GGUF")] = ...,  # type: ignore[assignment]
    data: DataOpt = "stdlib",
    seq_len: SeqLenOpt = None,
    calib_windows: CalibOpt = None,
    pattern: PatternOpt = "**/*",
    text_field: TextFieldOpt = "text",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing file")] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="read the model one block at a time")] = True,
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write llama.cpp's importance matrix (Σx² of each linear layer's inputs) of a model."""
    _setup(threads, quiet or as_json)
    if output.exists() and not overwrite:
        raise OutputError(f"{output} exists; pass --overwrite to replace it")
    if not output.parent.is_dir():
        raise OutputError(f"{output.parent} is not a directory; create it first")
    options = _data_options(data, pattern, text_field, seq_len=seq_len, calib_windows=calib_windows)
    # the model, data, config (an encoder refused), weights and tokenizer, as compress checks them
    _, tokenizer = check_inputs(model, options, None, overwrite=False)
    path = model_dir(model)
    streamed = stream and path is not None and any(path.glob("*.safetensors")) and not (path / META_FILE).exists()
    if streamed and path is not None:
        net: Any = open_streamed(path)
    else:
        loaded = load(model, device="cpu")
        tokenizer, net = loaded.tokenizer, loaded.model
    try:
        windows = options.load(tokenizer, "calib", options.calib_windows).windows
        im = collect_imatrix(net, windows, progress=not (quiet or as_json), dataset=str(data))
    finally:
        if streamed:
            close(net)
    size = write_imatrix(output, im)
    report = {"path": str(output), "bytes": size, "entries": len(im.entries), "chunks": im.chunk_count}
    report |= {
        "chunk_size": im.chunk_size,
        "format": "dat" if output.suffix == ".dat" else "gguf",
        "streamed": streamed,
    }
    if as_json:
        _print_json(report)
        return
    console.print(
        f"wrote {output} ({report['format']}, {len(im.entries)} matrices, {im.chunk_count} chunks x "
        f"{im.chunk_size} tokens{', streamed' if streamed else ''})",
        soft_wrap=True,
    )
