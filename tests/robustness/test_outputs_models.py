"""Hostile inputs, groups 1-3, 6 and 7 of issue 29: an output that would destroy the input, a model
that lies about itself, numbers that would be wrong, what a failed or killed run leaves behind, and
messages that must stay one line."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.robustness.conftest import EVAL_FAST, FAST, assert_refused, lmpress, tree

# ---- helpers: the lies, written into a copy of the tiny model ----------------------------------


def _config(model: Path, **changes: object) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


def _header(model: Path) -> tuple[dict[str, object], bytes]:
    raw = (model / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_header(model: Path, header: dict[str, object], data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)


def _edit_weights(model: Path, fn) -> None:  # type: ignore[no-untyped-def]
    state = load_file(model / "model.safetensors")
    fn(state)
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})


# ---- group 1: the input is never destroyed -----------------------------------------------------


@pytest.mark.parametrize(
    ("output", "flags", "says"),
    [
        ("model", ("--overwrite",), "is the input model"),
        ("model", (), "is the input model"),
        ("model/sub", (), "lies inside the input model"),
        ("model/sub", ("--overwrite",), "lies inside the input model"),
        ("..", ("--overwrite",), "holds the input model"),  # the model's parent, seen from below
        ("link", ("--overwrite",), "is the input model"),  # a symlink to the model
    ],
)
def test_output_that_is_or_holds_the_input(
    capsys: pytest.CaptureFixture[str], tiny: Path, work: Path, output: str, flags: tuple[str, ...], says: str
) -> None:
    (work / "link").symlink_to(tiny, target_is_directory=True)
    before = tree(work)
    if output == "..":
        os.chdir(tiny)
        output, model = "..", "."
    else:
        model = str(tiny)
    r = lmpress(capsys, "compress", model, "-r", "w8", "-o", output, *flags, *FAST)
    assert_refused(r, says, before=before, root=work, max_seconds=10)


@pytest.mark.parametrize(("to", "output"), [("gguf", "model/x.gguf"), ("onnx", "model/onnx"), ("onnx", "model")])
def test_export_into_the_input(
    capsys: pytest.CaptureFixture[str], tiny: Path, work: Path, to: str, output: str
) -> None:
    if to == "onnx":
        pytest.importorskip("onnx")
    before = tree(work)
    r = lmpress(capsys, "export", tiny, "--to", to, "-o", output, "--overwrite")
    assert_refused(r, "input model", before=before, root=work, max_seconds=10)


def test_compress_export_beside_is_checked_against_the_input(
    capsys: pytest.CaptureFixture[str], tiny: Path, work: Path
) -> None:
    """``-o model-x --export onnx`` writes model-x-onnx; an input named so is refused up front."""
    pytest.importorskip("onnx")
    src = tiny.rename(work / "out-onnx")
    before = tree(work)
    r = lmpress(capsys, "compress", src, "-r", "w8", "-o", "out", "--export", "onnx", "--overwrite", *FAST)
    assert_refused(r, "is the input model", before=before, root=work, max_seconds=10)


# ---- group 2: a model that lies is refused before any work -------------------------------------


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_config_wider_than_the_weights(
    capsys: pytest.CaptureFixture[str], tiny: Path, work: Path, command: str
) -> None:
    _config(tiny, intermediate_size=160)  # the weights are 128 wide
    before = tree(work)
    extra = ("-r", "w8", "-o", "out") if command == "compress" else ()
    r = lmpress(capsys, command, tiny, *extra, *(FAST if command == "compress" else EVAL_FAST))
    assert_refused(r, "mlp.", "has shape", "intermediate_size=160", before=before, root=work, max_seconds=15)


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_header_relabels_a_shape(capsys: pytest.CaptureFixture[str], tiny: Path, work: Path, stream: str) -> None:
    header, data = _header(tiny)
    name = "model.layers.0.mlp.down_proj.weight"
    entry = header[name]
    assert isinstance(entry, dict)
    entry["shape"] = list(reversed(entry["shape"]))  # same bytes, transposed label
    _write_header(tiny, header, data)
    before = tree(work)
    r = lmpress(capsys, "compress", tiny, "-r", "w8", "-o", "out", stream, *FAST)
    assert_refused(r, name, "[128, 64]", "[64, 128]", before=before, root=work, max_seconds=15)


def test_header_relabels_a_dtype(capsys: pytest.CaptureFixture[str], tiny: Path, work: Path) -> None:
    header, data = _header(tiny)
    name = "model.layers.1.self_attn.q_proj.weight"
    entry = header[name]
    assert isinstance(entry, dict)
    entry["dtype"] = "I32"  # same size as F32
    _write_header(tiny, header, data)
    before = tree(work)
    r = lmpress(capsys, "eval", tiny, *EVAL_FAST)
    assert_refused(r, name, "I32", before=before, root=work, max_seconds=15)


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"num_hidden_layers": 200_000}, "num_hidden_layers=200000"),
        ({"vocab_size": 10**12}, "vocab_size"),
        ({"hidden_size": -64}, "hidden_size=-64"),
        ({"num_hidden_layers": "2"}, "num_hidden_layers must be a whole number"),
        ({"intermediate_size": 10**9}, "intermediate_size"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ],
)
@pytest.mark.parametrize("command", ["compress", "eval", "export"])
def test_implausible_sizes(
    capsys: pytest.CaptureFixture[str], tiny: Path, work: Path, changes: dict[str, object], says: str, command: str
) -> None:
    _config(tiny, **changes)
    before = tree(work)
    args = {
        "compress": ("compress", tiny, "-r", "w8", "-o", "out", *FAST),
        "eval": ("eval", tiny, *EVAL_FAST),
        "export": ("export", tiny, "--to", "gguf", "-o", "x.gguf"),
    }[command]
    r = lmpress(capsys, *args)
    assert_refused(r, says, before=before, root=work, max_seconds=10)


def test_config_with_more_blocks_than_the_weights(capsys: pytest.CaptureFixture[str], tiny: Path, work: Path) -> None:
    _config(tiny, num_hidden_layers=3)
    before = tree(work)
    r = lmpress(capsys, "compress", tiny, "-r", "w8", "-o", "out", *FAST)
    assert_refused(r, "model.layers.2.", "config.json says 3 blocks, the weights hold 2", before=before, root=work)


def test_weights_with_more_blocks_than_the_config(capsys: pytest.CaptureFixture[str], tiny: Path, work: Path) -> None:
    _config(tiny, num_hidden_layers=1)
    before = tree(work)
    r = lmpress(capsys, "eval", tiny, *EVAL_FAST)
    assert_refused(r, "model.layers.1.", "config.json says 1 blocks, the weights hold 2", before=before, root=work)


def test_missing_tensor(capsys: pytest.CaptureFixture[str], tiny: Path, work: Path) -> None:
    _edit_weights(tiny, lambda s: s.pop("model.norm.weight"))
    before = tree(work)
    r = lmpress(capsys, "compress", tiny, "-r", "w8", "-o", "out", *FAST)
    assert_refused(r, "model.norm.weight", "lack", before=before, root=work)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_tied_head_is_not_missing(capsys: pytest.CaptureFixture[str], work: Path, tokenizer, arch: str) -> None:  # type: ignore[no-untyped-def]
    """A valid model must get in: a tied head is saved once, as the embeddings."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    config = tiny_config(arch, len(tokenizer))
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(work / "tied")
    tokenizer.save_pretrained(work / "tied")
    r = lmpress(capsys, "eval", work / "tied", *EVAL_FAST, "--json")
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["eval_tokens"] == 2 * 31


# ---- group 3: no wrong numbers with exit 0 -----------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight(capsys: pytest.CaptureFixture[str], tiny: Path, work: Path, value: float) -> None:
    def poison(state: dict[str, torch.Tensor]) -> None:
        state["model.layers.1.mlp.up_proj.weight"][3, 5] = value

    _edit_weights(tiny, poison)
    before = tree(work)
    r = lmpress(capsys, "eval", tiny, *EVAL_FAST)
    assert_refused(r, "model.layers.1.mlp.up_proj.weight", "NaN or infinite", before=before, root=work)


def test_non_finite_reference(capsys: pytest.CaptureFixture[str], tiny: Path, tiny_master: Path, work: Path) -> None:
    _edit_weights(tiny, lambda s: s["model.embed_tokens.weight"].fill_(float("nan")))
    before = tree(work)
    r = lmpress(capsys, "eval", tiny_master, "--reference", tiny, *EVAL_FAST)
    assert_refused(r, "model.embed_tokens.weight", before=before, root=work)


def test_overflowing_activations(capsys: pytest.CaptureFixture[str], tiny: Path, work: Path) -> None:
    """Finite weights whose activations overflow: the logits say where it starts. Found only once
    the model runs, so the progress lines of loading and tokenizing (announced past 3 s, as on a
    loaded machine) may come before the error line."""

    def overflow(state: dict[str, torch.Tensor]) -> None:
        state["model.norm.weight"].fill_(3e38)  # finite, as is every weight; the norm's output is not

    _edit_weights(tiny, overflow)
    before = tree(work)
    r = lmpress(capsys, "eval", tiny, *EVAL_FAST)
    assert_refused(
        r,
        "NaN or infinite logits on evaluation window 0",
        "first in model.norm",
        before=before,
        root=work,
        after_work=True,
    )


@pytest.mark.parametrize("command", ["eval", "compress"])
def test_seq_len_past_the_positions(capsys: pytest.CaptureFixture[str], tiny: Path, work: Path, command: str) -> None:
    before = tree(work)
    extra = ("-r", "w8", "-o", "out") if command == "compress" else ()
    r = lmpress(capsys, command, tiny, *extra, "--seq-len", "1024", "--max-windows", "1", "--no-speed")
    assert_refused(r, "--seq-len 1024", "(512, config.json)", "--seq-len 512", before=before, root=work)


def test_builtin_seq_len_past_its_positions(capsys: pytest.CaptureFixture[str], work: Path) -> None:
    config = json.loads(
        (Path(__import__("lmpress").__file__).parent / "models/builtin/reference/config.json").read_text()
    )
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    r = lmpress(capsys, "eval", "--seq-len", str(limit * 2), "--max-windows", "1", "--no-speed")
    assert_refused(r, f"--seq-len {limit * 2}", f"--seq-len {limit}", before={}, root=work)


# ---- group 6: fail early, leave nothing behind -------------------------------------------------


@pytest.mark.parametrize("output", ["/proc/lmpress-out", "afile/out", "/proc/self/lmpress/out"])
def test_unwritable_output_fails_before_work(
    capsys: pytest.CaptureFixture[str], tiny: Path, work: Path, output: str
) -> None:
    (work / "afile").write_text("x")
    before = tree(work)
    r = lmpress(capsys, "compress", tiny, "-r", "w8", "-o", output, *FAST)
    assert_refused(r, "cannot create", before=before, root=work, max_seconds=10)


def test_failed_run_removes_the_parents_it_made(capsys: pytest.CaptureFixture[str], tiny: Path, work: Path) -> None:
    """A failure mid-run (a layer with a NaN, found by the streamed quantizer) removes a/b/."""

    def poison(state: dict[str, torch.Tensor]) -> None:
        state["model.layers.0.mlp.gate_proj.weight"][0, 0] = float("nan")

    _edit_weights(tiny, poison)
    before = tree(work)
    r = lmpress(capsys, "compress", tiny, "-r", "w8", "-o", "a/b/out", *FAST)
    assert_refused(r, "model.layers.0.mlp.gate_proj", before=before, root=work, after_work=True)


def test_rerun_cleans_what_a_killed_run_left(capsys: pytest.CaptureFixture[str], tiny: Path, work: Path) -> None:
    dead = 2**22 + 12345  # above the default pid_max: no process has it
    for kind in ("stream", "tmp", "old"):
        stale = work / f".out.{kind}-dead"
        stale.mkdir()
        (stale / "spill.safetensors").write_bytes(b"x" * 100)
        (stale / ".lmpress-lock").write_text(f"{dead} {os.uname().nodename}")
    (work / f".out.gguf.tmp-{dead}").write_bytes(b"partial")
    live = work / ".out.stream-live"  # a run of this output that is still going: kept
    live.mkdir()
    (live / ".lmpress-lock").write_text(f"{os.getpid()} {os.uname().nodename}")
    r = lmpress(
        capsys,
        "compress",
        tiny,
        "-r",
        "gguf-q8_0",
        "-o",
        "out",
        "--export",
        "gguf",
        *FAST,
        "--calib-windows",
        "8",
        "--no-eval",
    )
    if r.code != 0 and "llama" in r.stderr:
        pytest.skip("the gguf extra is not installed")
    assert r.code == 0, r.stderr
    hidden = sorted(p.name for p in work.iterdir() if p.name.startswith("."))
    assert hidden == [".out.stream-live"]
    assert (work / "out" / "lmpress.json").is_file() and (work / "out.gguf").is_file()


def test_overwrite_leaves_no_old_copy(capsys: pytest.CaptureFixture[str], tiny: Path, work: Path) -> None:
    for _ in range(2):
        r = lmpress(capsys, "compress", tiny, "-r", "w8", "-o", "out", "--overwrite", *FAST, "--no-eval")
        assert r.code == 0, r.stderr
    assert sorted(p.name for p in work.iterdir()) == ["model", "out"]


# ---- group 7: one line means one line ----------------------------------------------------------


@pytest.mark.parametrize("name", ["bad\nname", "esc\x1b[31mred", "tab\there"])
def test_control_characters_are_escaped(capsys: pytest.CaptureFixture[str], work: Path, name: str) -> None:
    r = lmpress(capsys, "eval", f"./{name}", *EVAL_FAST)
    assert_refused(r, repr(name)[1:-1].replace("\\\\", "\\"), before={}, root=work)
    assert "\x1b" not in r.stderr.replace("\x1b[1;31m", "").replace("\x1b[0m", "")


@pytest.mark.parametrize(
    "args",
    [
        ("--bogus",),
        ("compress", "--nope"),
        ("compress",),  # --recipe is required
        ("eval", "--seq-len", "x"),
        ("eval", "--seq-len", "1"),
        ("nosuchcommand",),
        ("export", "--to"),
    ],
)
def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str], work: Path, args: tuple[str, ...]) -> None:
    r = lmpress(capsys, *args)
    assert_refused(r, "--help", before={}, root=work)
    assert "╭" not in r.stderr


def test_refusal_is_the_only_line(capsys: pytest.CaptureFixture[str], tiny: Path, work: Path) -> None:
    """No progress line ("not streaming: ...") comes before a refusal of the model."""
    _config(tiny, intermediate_size=160)
    r = lmpress(capsys, "compress", tiny, "-r", "w8", *FAST)  # no -o: the whole model in memory
    assert_refused(r, "intermediate_size=160")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to run as another user")
def test_unwritable_places_as_an_ordinary_user() -> None:
    """Permissions only bind an ordinary user (the suite runs as root): an output under a read-only
    directory is refused before any work; an empty read-only directory as -o is replaced whole (it
    used to fail after all the work and leave a `.out.old-*` directory)."""
    import subprocess
    import sys
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="lmpress-user-"))  # pytest's own tmp is root's alone
    tmp_path.chmod(0o777)
    try:
        _as_an_ordinary_user(tmp_path, sys.executable, subprocess.run)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _as_an_ordinary_user(tmp_path: Path, python: str, run) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "ro").mkdir(mode=0o555)
    (tmp_path / "out").mkdir(mode=0o555)  # empty, owned by root, not writable by the user
    env = {**os.environ, "HOME": str(tmp_path), "LMPRESS_CACHE": str(tmp_path / ".cache"), "LMPRESS_TRACK": "0"}
    user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-m", "lmpress.cli"]

    def lm(*args: str):  # type: ignore[no-untyped-def]
        cmd = [*user, "compress", "-r", "bf16", "--no-eval", "--samples", "0", *args]
        return run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    r = lm("-o", "ro/out")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "ro is not a writable directory" in r.stderr, r.stderr
    r = lm("-o", "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "lmpress.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
