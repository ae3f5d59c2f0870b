"""Fault injection on the files and paths flashtier reads and writes: every file kind cut short,
paths that cannot be read as what they should be (a folder, a dangling link, a named pipe, a
device, an empty file), and concurrent writers of one output.

Each bad input must end in one error of the exact class, naming the path and saying what to do:
from the library (``open_model`` and the readers) an exception, from the CLI (``flashtier.apps.cli``
main, in-process; in a subprocess where a hang is the fault) exit status 1 and one line on stderr,
never a traceback, a hang, a silent answer or a partial file left behind.

Fixtures are the tiniest models (64-wide, two layers): the apps tests' chat model (tiny-mixtral with
a byte-level BPE tokenizer), its converted folder, compressed copy and q8_0 GGUF file, and a ReLU
tiny-llama with FFN bundles and sparsity predictors.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch

from flashtier.errors import CheckpointError, FlashtierError, IntegrityError, StorageError
from flashtier.runtime.engine import open_model

ROOT = Path(__file__).parents[2]
_spec = importlib.util.spec_from_file_location("faults_apps_fixtures", ROOT / "tests" / "apps" / "conftest.py")
_apps = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(_apps)
write_chat_model = _apps.write_chat_model  # tiny-mixtral (float32, vocab 320) + BPE tokenizer + chat template

IDS = "1,2,3,4"
BUDGET = "600K"  # a paged run of the chat model with a 64-token context (it needs ~360 KiB)
CONTEXT = "64"
SPARSE_BUDGET = "3M"  # the bundled model's sparse FFN (it needs ~2.4 MiB, mostly KV)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a busy machine
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------ helpers
def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``flashtier ARGV`` in this process: (exit status, stdout, stderr). An exception that
    escapes ``main`` is what a user would see as a traceback: the test fails showing it."""
    from flashtier.apps.cli import main

    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        pytest.fail(f"flashtier {' '.join(argv)} raised (a traceback at the CLI):\n{traceback.format_exc()}")
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(rc: int, err: str, *words: str) -> None:
    """Exit status 1, one line on stderr holding every one of ``words``, no traceback."""
    assert rc == 1, f"exit status {rc}, stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"


def refused_by_cli(capsys, argv: list[str], *words: str) -> None:
    rc, _, err = cli(capsys, *argv)
    assert_one_line(rc, err, *words)


def flashtier_subprocess(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m flashtier ARGS`` in a subprocess: for faults whose failure mode is a hang."""
    try:
        return subprocess.run([sys.executable, "-m", "flashtier", *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flashtier {' '.join(args)} hung (no result in {timeout} s)")


def raises_exactly(cls: type[FlashtierError], fn: Callable[[], object], *words: str) -> str:
    """``fn()`` raises exactly ``cls`` (not a subclass) whose message holds ``words``; the message."""
    with pytest.raises(FlashtierError) as info:
        fn()
    assert info.type is cls, f"expected {cls.__name__}, got {info.type.__name__}: {info.value}"
    msg = str(info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


def open_and_generate(path: Path, **options: object) -> None:
    with open_model(path, **options) as llm:
        llm.generate([1, 2, 3, 4], max_new_tokens=2, ignore_eos=True)


def cut(path: Path, at: int) -> Path:
    """Truncate ``path`` to ``at`` bytes (negative: that many bytes shorter)."""
    size = path.stat().st_size
    os.truncate(path, at if at >= 0 else size + at)
    return path


def generate_argv(path: Path, *extra: str) -> list[str]:
    if "--dram-budget" in extra:
        extra = (*extra, "--max-context", CONTEXT)
    return ["generate", str(path), "--prompt-ids", IDS, "--max-new-tokens", "2", "--greedy", *extra]


# ------------------------------------------------------------------------------------ fixtures
@dataclass(frozen=True)
class Files:
    model: Path  # Hugging Face folder: config, model.safetensors, tokenizer
    converted: Path  # `flashtier convert`: expert extents + flashtier_experts.json
    compressed: Path  # `flashtier compress`: flashtier-compressed/{manifest.json, model.ftz}
    gguf: Path  # `flashtier quantize --type q8_0` (with the tokenizer in its metadata)
    bundled: Path  # ReLU model, `convert --bundle` + sparsity predictors


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    from flashtier.apps.cli import main
    from flashtier.prefetch.sparsity import PredictorTraining
    from flashtier.runtime.calibrate import CalibrationText, calibrate
    from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model
    from flashtier.checkpoint.bundles import convert_bundled

    root = tmp_path_factory.mktemp("files")
    model = write_chat_model(root / "model")
    compressed = shutil.copytree(model, root / "compressed")
    with contextlib.redirect_stdout(None):
        assert main(["convert", str(model), str(root / "converted")]) == 0
        assert main(["compress", str(compressed)]) == 0
        assert main(["quantize", str(model), str(root / "m.gguf"), "--type", "q8_0"]) == 0
    relu = dict(PRESETS["tiny-llama"], hidden_act="relu", tie_word_embeddings=True)
    src = write_model(root / "relu", MakeModelSpec(relu, "float32", seed=5))
    bundled = convert_bundled(src, root / "bundled")
    ids = np.random.default_rng(0).integers(3, 250, 256).tolist()
    calibrate(bundled, ids, PredictorTraining(rank=4, steps=5, batch=64), CalibrationText(max_tokens=256, seq=64))
    return Files(model, root / "converted", compressed, root / "m.gguf", bundled)


def test_the_clean_fixtures_run(files, capsys):
    """The baseline: every fixture loads and generates, so each failure below is the fault's."""
    for path, extra in [(files.model, ()), (files.converted, ("--dram-budget", BUDGET)),
                        (files.compressed, ("--dram-budget", BUDGET)), (files.gguf, ()),
                        (files.bundled, ("--dram-budget", SPARSE_BUDGET, "--sparse-ffn"))]:
        rc, out, err = cli(capsys, *generate_argv(path, *extra))
        assert rc == 0, err
    rc, out, err = cli(capsys, "generate", str(files.model), "--prompt", "hello", "--max-new-tokens", "2", "--greedy")
    assert rc == 0, err
    for path in (files.model, files.converted, files.compressed, files.gguf):
        rc, out, err = cli(capsys, "verify", str(path))
        assert rc == 0, err


# ----------------------------------------------------------------------- 1. truncated files
@dataclass(frozen=True)
class Cut:
    """One file kind cut short: which fixture, which file in it, where to cut, what must happen."""

    fixture: str
    file: str  # relative to the fixture ("" for the fixture itself, a file)
    at: int | Callable[[Path], int]
    error: type[FlashtierError]
    words: tuple[str, ...]  # besides the file's path
    cli: tuple[tuple[str, ...], ...]  # CLI runs that must refuse it (each: command + extra flags)
    library: tuple[dict, ...]  # open_model options that must refuse it


def _in_the_vocabulary(gguf: Path) -> int:
    """An offset inside the GGUF file's tokenizer.ggml.tokens array (metadata, before any tensor)."""
    return gguf.read_bytes().index(b"tokenizer.ggml.tokens") + 400


def _in_the_first_expert(model: Path) -> int:
    entry = json.loads((model.parent / "flashtier_experts.json").read_text())["experts"][0]
    return entry["offset"] + entry["length"] // 2


PAGED = {"dram_budget": BUDGET, "max_context": int(CONTEXT)}
SPARSE = {"dram_budget": SPARSE_BUDGET, "sparse_ffn": True}
CUTS = {
    "gguf-header": Cut("gguf", "", 200, CheckpointError, ("file ends inside the header", "truncated"),
                       (("verify",), ("generate",), ("plan",)), ({}, PAGED)),
    "gguf-tokenizer-metadata": Cut("gguf", "", _in_the_vocabulary, CheckpointError, ("truncated",),
                                   (("verify",), ("generate",)), ({},)),
    "gguf-tensor-data": Cut("gguf", "", -100, CheckpointError, ("the GGUF file is truncated", "download it again"),
                            (("verify",), ("generate",), ("plan",)), ({}, PAGED)),
    "safetensors-header": Cut("model", "model.safetensors", 100, CheckpointError,
                              ("runs past the end of the file", "re-download or re-convert"),
                              (("verify",), ("generate",), ("plan",), ("convert",), ("quantize",)), ({}, PAGED)),
    "safetensors-data": Cut("model", "model.safetensors", -100, CheckpointError,
                            ("truncated or corrupted", "re-download or re-convert"),
                            (("verify",), ("generate",), ("plan",), ("convert",), ("compress",)), ({}, PAGED)),
    "converted-expert-shard": Cut("converted", "model.safetensors", _in_the_first_expert, CheckpointError,
                                  ("truncated or corrupted", "re-download or re-convert"),
                                  (("verify",), ("generate", "--dram-budget", BUDGET)), ({}, PAGED)),
    "converted-manifest": Cut("converted", "flashtier_experts.json", 300, IntegrityError,
                              ("unreadable expert manifest", "convert the checkpoint again"),
                              (("verify",), ("generate", "--dram-budget", BUDGET)), ({}, PAGED)),
    "compressed-side-file": Cut("compressed", "flashtier-compressed/model.ftz", -100, IntegrityError,
                                ("the manifest says", "flashtier compress", "--compressed off"),
                                (("verify",), ("generate", "--dram-budget", BUDGET), ("plan",)), (PAGED,)),
    "compressed-manifest": Cut("compressed", "flashtier-compressed/manifest.json", 300, IntegrityError,
                               ("malformed manifest", "flashtier compress", "--compressed off"),
                               (("verify",), ("generate", "--dram-budget", BUDGET), ("plan",)), (PAGED,)),
    "ffn-bundle-layer-file": Cut("bundled", "ffn_bundles/layer_000.bin", -100, IntegrityError,
                                 ("the bundle file is truncated", "flashtier convert --bundle"),
                                 (("generate", "--dram-budget", SPARSE_BUDGET, "--sparse-ffn"),), (SPARSE,)),
    "ffn-bundle-manifest": Cut("bundled", "ffn_bundles/manifest.json", 200, CheckpointError,
                               ("unreadable bundle manifest", "flashtier convert --bundle"),
                               (("generate", "--dram-budget", SPARSE_BUDGET, "--sparse-ffn"),), (SPARSE,)),
    "sparsity-predictor": Cut("bundled", "sparsity_predictor.safetensors", -100, CheckpointError,
                              ("truncated or corrupted", "flashtier calibrate"),
                              (("generate", "--dram-budget", SPARSE_BUDGET, "--sparse-ffn"), ("verify",)),
                              (SPARSE, {})),
    "config.json": Cut("model", "config.json", 100, CheckpointError, ("not readable JSON",),
                       (("verify",), ("generate",), ("plan",), ("convert",), ("quantize",)), ({}, PAGED)),
    "tokenizer.json": Cut("model", "tokenizer.json", 3000, CheckpointError,
                          ("cannot load tokenizer", "restore the file"), (("generate",),), ({},)),
}


def _run_cli_case(capsys, cmd: tuple[str, ...], target: Path, tmp: Path, *words: str) -> None:
    name, *extra = cmd
    if name == "generate":
        argv = generate_argv(target, *extra)
    elif name == "convert":
        argv = ["convert", str(target), str(tmp / "convert-out")]
    elif name == "quantize":
        argv = ["quantize", str(target), str(tmp / "quantize-out.gguf"), "--type", "q8_0"]
    else:
        argv = [name, str(target), *extra]
    refused_by_cli(capsys, argv, *words)
    if name in ("convert", "quantize"):  # nothing left behind, not even a temporary sibling
        assert sorted(p.name for p in tmp.iterdir() if "out" in p.name) == []


@pytest.mark.parametrize("kind", list(CUTS))
def test_a_file_cut_short_is_refused_with_its_path(files, tmp_path, capsys, kind):
    case = CUTS[kind]
    src: Path = getattr(files, case.fixture)
    if src.is_dir():
        target = shutil.copytree(src, tmp_path / "bad")
        victim = target / case.file
    else:
        target = victim = Path(shutil.copy(src, tmp_path / src.name))
    at = case.at(victim) if callable(case.at) else case.at
    assert 0 < (at if at >= 0 else victim.stat().st_size + at) < victim.stat().st_size
    cut(victim, at)
    for cmd in case.cli:
        _run_cli_case(capsys, cmd, target, tmp_path, str(victim), *case.words)
    for options in case.library:
        raises_exactly(case.error, lambda: open_and_generate(target, **options), str(victim), *case.words)


def test_a_tokenizer_config_cut_inside_a_character_is_refused(files, tmp_path, capsys):
    """Cut inside a multi-byte UTF-8 character: was a UnicodeDecodeError traceback."""
    bad = shutil.copytree(files.model, tmp_path / "bad")
    cfg = bad / "tokenizer_config.json"
    cfg.write_bytes(b'{"chat_template": "caf\xc3')
    refused_by_cli(capsys, generate_argv(bad), str(cfg), "not readable JSON", "restore the file")
    raises_exactly(CheckpointError, lambda: open_model(bad), str(cfg), "not readable JSON")


@pytest.mark.parametrize("damage", ["truncated", "emptied", "deleted"])
def test_a_damaged_kv_spill_file_is_a_storage_error(tmp_path, damage):
    from flashtier.runtime.kv.layout import KVBlockLayout
    from flashtier.runtime.kv.spill import KVSpillStore

    lay = KVBlockLayout(1, 2, 32, 32, torch.bfloat16)
    store = KVSpillStore(lay, str(tmp_path))
    block = torch.randn(*lay.block_shape).to(torch.bfloat16)
    store.write((0, 3), block)
    store.write((0, 4), block)
    path = Path(store.path_of((0, 3)))
    {"truncated": lambda: cut(path, -100), "emptied": lambda: cut(path, 0), "deleted": path.unlink}[damage]()
    raises_exactly(StorageError, lambda: store.read([(0, 4), (0, 3)]), "layer 0, block 3", str(path),
                   "keep --kv-spill-dir private")
    assert torch.equal(store.read([(0, 4)])[0], block)  # the other block still reads back
    store.close()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------- 2. unreadable paths
def _replace_with_folder(folder: Path, name: str) -> Path:
    p = folder / name
    p.unlink()
    p.mkdir()
    (p / "x").write_text("not a weight file")
    return p


def _copy(files: Files, tmp: Path) -> Path:
    return shutil.copytree(files.model, tmp / "m")


def _config_is_a_folder(files: Files, tmp: Path) -> tuple[Path, Path]:
    model = _copy(files, tmp)
    _replace_with_folder(model, "config.json")
    return model, model  # "MODEL has no config.json"


def _shard_is_a_folder(files: Files, tmp: Path) -> tuple[Path, Path]:
    model = _copy(files, tmp)
    return model, _replace_with_folder(model, "model.safetensors")


def _gguf_path_is_a_folder(files: Files, tmp: Path) -> tuple[Path, Path]:
    folder = tmp / "m.gguf"
    folder.mkdir()
    return folder, folder


def _shard_links(target: str | None) -> Callable[[Files, Path], tuple[Path, Path]]:
    def make(files: Files, tmp: Path) -> tuple[Path, Path]:
        model = _copy(files, tmp)
        shard = model / "model.safetensors"
        shard.unlink()
        shard.symlink_to(target or tmp / "moved-away.safetensors")  # None: a dangling link
        return model, shard

    return make


def _empty_shard(files: Files, tmp: Path) -> tuple[Path, Path]:
    model = _copy(files, tmp)
    return model, cut(model / "model.safetensors", 0)


def _empty_gguf(files: Files, tmp: Path) -> tuple[Path, Path]:
    path = tmp / "m.gguf"
    path.write_bytes(b"")
    return path, path


ALL = ("verify", "generate", "plan", "convert")
PATH_CASES: dict[str, tuple[Callable[[Files, Path], tuple[Path, Path]], type[FlashtierError], tuple[str, ...],
                            tuple[str, ...]]] = {
    # id: (make(files, tmp) -> (model path, the path the message names), error, words, commands)
    "config.json-is-a-folder": (_config_is_a_folder, CheckpointError,
                                ("has no config.json", "Hugging Face model folder"), ALL),
    "model.safetensors-is-a-folder": (_shard_is_a_folder, CheckpointError,
                                      ("not a regular file (a folder)", "replace it"), ALL),
    "gguf-path-is-a-folder": (_gguf_path_is_a_folder, CheckpointError, ("has no config.json",),
                              ("verify", "generate", "plan")),
    "dangling-shard-link": (_shard_links(None), CheckpointError, ("a link to a missing file", "restore the file"), ALL),
    "missing-model-path": (lambda f, t: (t / "nope", t / "nope"), CheckpointError,
                           ("does not exist", "pass a folder with config.json"), ALL),
    "dev-null-as-model": (lambda f, t: (Path("/dev/null"), Path("/dev/null")), CheckpointError,
                          ("is not a folder", "pass the model folder"), ALL),
    "dev-null-as-shard": (_shard_links("/dev/null"), CheckpointError, ("not a regular file (a device)", "replace it"),
                          ALL),
    "empty-shard": (_empty_shard, CheckpointError, ("truncated safetensors file (0 bytes", "re-download or re-convert"),
                    ALL),
    "empty-gguf": (_empty_gguf, CheckpointError, ("not a GGUF file",), ("verify", "generate", "plan")),
}


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_an_unreadable_path_is_one_clear_error(files, tmp_path, capsys, case):
    make, error, words, commands = PATH_CASES[case]
    model, named = make(files, tmp_path)
    for cmd in commands:
        _run_cli_case(capsys, (cmd,), model, tmp_path, str(named), *words)
    raises_exactly(error, lambda: open_model(model), str(named), *words)


def test_a_named_pipe_as_a_shard_is_refused_not_waited_on(files, tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: every command hung forever."""
    model = shutil.copytree(files.model, tmp_path / "m")
    shard = model / "model.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    for args in (["verify", str(model)], generate_argv(model), ["convert", str(model), str(tmp_path / "out")],
                 ["quantize", str(model), str(tmp_path / "q.gguf")], ["compress", str(model)]):
        p = flashtier_subprocess(*args)
        assert_one_line(p.returncode, p.stderr, str(shard), "not a regular file (a named pipe)")
    raises_exactly(CheckpointError, lambda: open_model(model), str(shard), "named pipe")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["m"]  # no output, no temporary sibling


def test_a_named_pipe_as_the_model_path_is_refused(tmp_path):
    fifo = tmp_path / "m.gguf"
    os.mkfifo(fifo)
    p = flashtier_subprocess("generate", str(fifo), "--prompt-ids", IDS, "--max-new-tokens", "1")
    assert_one_line(p.returncode, p.stderr, str(fifo), "is not a folder", "pass the model folder")


def test_a_compressed_manifest_that_is_a_folder_is_refused(files, tmp_path, capsys):
    """Was an IsADirectoryError traceback (the manifest was read without catching OSError)."""
    bad = shutil.copytree(files.compressed, tmp_path / "bad")
    manifest = _replace_with_folder(bad / "flashtier-compressed", "manifest.json")
    words = (str(manifest), "cannot read the manifest", "flashtier compress", "--compressed off")
    for argv in (["verify", str(bad)], generate_argv(bad, "--dram-budget", BUDGET), ["plan", str(bad)]):
        refused_by_cli(capsys, argv, *words)
    raises_exactly(IntegrityError, lambda: open_and_generate(bad, **PAGED), *words)
    rc, _, err = cli(capsys, *generate_argv(bad, "--dram-budget", BUDGET, "--compressed", "off"))
    assert rc == 0, err  # the way out the message names works


def test_a_file_as_the_kv_spill_folder_is_one_error(files, tmp_path, capsys):
    """Was a FileExistsError traceback from os.makedirs, outside the StorageError wrapping."""
    blocker = tmp_path / "spill"
    blocker.write_text("a file")
    ids = ",".join(str(i % 250 + 1) for i in range(1900))  # enough context that KV blocks spill
    argv = ["generate", str(files.model), "--prompt-ids", ids, "--max-new-tokens", "1", "--greedy",
            "--attention", "retrieval", "--window", "32", "--sink-tokens", "4", "--kv-dram-budget", "1600K"]
    for spill_dir, why in ((blocker, "it is a file, not a folder"), (blocker / "sub", "Not a directory")):
        refused_by_cli(capsys, [*argv, "--kv-spill-dir", str(spill_dir)], str(spill_dir), why,
                       "pass a writable folder with --kv-spill-dir")
    assert blocker.read_text() == "a file"
    rc, out, err = cli(capsys, *argv, "--kv-spill-dir", str(tmp_path / "ok"), "--json")
    assert rc == 0, err
    assert json.loads(out)["stats"]["kv_blocks_spilled"] > 0  # the runs above did reach the spill
    assert list((tmp_path / "ok").iterdir()) == []  # the run's spill folder is removed


# -------------------------------------------------------------------- 3. concurrent writers
def _siblings(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != name)


def _barrier_threads(n: int, patch: Callable[[Callable[[], None]], None], *argvs: list[str]) -> list[int]:
    """Run ``main(argv)`` for each of ``argvs`` on its own thread, all meeting at a barrier that
    ``patch`` places inside the work (so their writes overlap for sure). Their exit statuses."""
    from flashtier.apps.cli import main

    barrier = threading.Barrier(n, timeout=30)
    local = threading.local()

    def meet() -> None:
        if not getattr(local, "met", False):
            local.met = True
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()

    patch(meet)
    results: list[object] = [None] * len(argvs)

    def run(i: int, argv: list[str]) -> None:
        try:
            results[i] = main(argv)
        except BaseException:
            results[i] = traceback.format_exc()

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(argvs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(isinstance(r, int) for r in results), f"a writer raised (traceback at the CLI): {results}"
    return results  # type: ignore[return-value]


def _after_convert(monkeypatch) -> Callable[[Callable[[], None]], None]:
    from flashtier.checkpoint import expert_layout

    real = expert_layout.convert_experts

    def patch(meet: Callable[[], None]) -> None:
        def convert_then_meet(*a, **k):
            out = real(*a, **k)
            meet()  # both outputs written, neither in place yet
            return out

        monkeypatch.setattr(expert_layout, "convert_experts", convert_then_meet)

    return patch


@pytest.mark.parametrize("force", [False, True])
def test_two_converts_into_one_folder_at_once(files, tmp_path, capsys, monkeypatch, force):
    """Two threads (one process, one pid) converting into the same folder: both staged into
    `.out.partial-<pid>` and each removed the other's, leaving an empty folder reported as done."""
    out = tmp_path / "out"
    argv = ["convert", str(files.model), str(out)] + (["--force"] if force else [])
    results = _barrier_threads(2, _after_convert(monkeypatch), argv, argv)
    _, err = capsys.readouterr()
    if force:
        assert results == [0, 0], err  # the later one replaced the earlier one
    else:
        assert sorted(results) == [0, 1], err  # the later one is refused as if `out` had been there
        assert_one_line(1, err, str(out), "was written by another run", "pass --force")
    assert _siblings(tmp_path, "out") == []  # no .partial-* or .old-* left
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files.converted.iterdir())
    monkeypatch.undo()
    rc, _, err = cli(capsys, "verify", str(out))
    assert rc == 0, err
    open_and_generate(out, **PAGED)


RUNNER = textwrap.dedent("""
    import importlib, os, sys, time
    from pathlib import Path
    meeting, module, attr, when = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    mod = importlib.import_module(module)
    real = getattr(mod, attr)
    met = []

    def meet():  # a barrier between processes: each waits until both have arrived
        if not met:
            met.append(1)
            (meeting / str(os.getpid())).touch()
            deadline = time.monotonic() + 60
            while len(list(meeting.iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)

    def wrapped(*a, **k):
        if when == "before":
            meet()
        out = real(*a, **k)
        if when == "after":
            meet()
        return out

    setattr(mod, attr, wrapped)
    from flashtier.apps.cli import main
    sys.exit(main(sys.argv[5:]))
""")


def _two_processes(tmp: Path, module: str, attr: str, when: str,
                   *argvs: list[str]) -> list[subprocess.CompletedProcess]:
    meeting = tmp / "meeting"
    meeting.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", RUNNER, str(meeting), module, attr, when, *argv],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in argvs]
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail("a concurrent writer hung")
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def test_two_convert_processes_with_force_into_one_folder(files, tmp_path, capsys):
    work = tmp_path / "work"
    out = shutil.copytree(files.converted, work / "out")  # an old output both replace
    argv = ["convert", str(files.model), str(out), "--force"]
    for p in _two_processes(tmp_path, "flashtier.checkpoint.expert_layout", "convert_experts", "after",
                            argv, argv):
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert _siblings(work, "out") == []
    rc, _, err = cli(capsys, "verify", str(out))
    assert rc == 0, err


def test_two_quantize_processes_with_force_onto_one_file(files, tmp_path, capsys):
    out = tmp_path / "work" / "m.gguf"
    out.parent.mkdir()
    shutil.copy(files.gguf, out)
    argvs = [["quantize", str(files.model), str(out), "--force", "--type", t] for t in ("q8_0", "q4_k_m")]
    for p in _two_processes(tmp_path, "flashtier.checkpoint.quants", "quantize", "before", *argvs):
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert _siblings(out.parent, "m.gguf") == []  # no .m.gguf.tmp-* left
    rc, _, err = cli(capsys, "verify", str(out))
    assert rc == 0, err
    open_and_generate(out)


def test_two_quantize_threads_with_force_onto_one_file(files, tmp_path, capsys, monkeypatch):
    from flashtier.checkpoint import quants
    from flashtier.checkpoint.gguf_format import read_gguf

    real = quants.quantize

    def patch(meet: Callable[[], None]) -> None:
        def meet_then_quantize(*a, **k):
            meet()  # both writers have opened their temporary file
            return real(*a, **k)

        monkeypatch.setattr(quants, "quantize", meet_then_quantize)

    out = tmp_path / "m.gguf"
    argvs = [["quantize", str(files.model), str(out), "--force", "--type", t] for t in ("q8_0", "q4_k_m")]
    results = _barrier_threads(2, patch, *argvs)
    monkeypatch.undo()
    _, err = capsys.readouterr()
    assert _siblings(tmp_path, "m.gguf") == []
    rc, _, verr = cli(capsys, "verify", str(out))
    assert rc == 0, verr
    types = {t.ggml_type.name for t in read_gguf(out).tensors.values()}
    winners = [t for r, t in zip(results, ("Q8_0", "Q4_K")) if r == 0]
    assert results == [0, 0], err  # each run either succeeds, or fails leaving the other's file
    assert any(w in types for w in winners)  # the file is one a successful run wrote


def test_two_calibrations_saving_predictors_at_once(files, tmp_path, monkeypatch):
    import safetensors.torch

    from flashtier.prefetch.sparsity import PREDICTOR_FILE, PredictorSet

    folder = shutil.copytree(files.bundled, tmp_path / "b")
    from flashtier.checkpoint.folder import Checkpoint
    from flashtier.checkpoint.bundles import model_fingerprint

    predictors = PredictorSet.load(folder, model_fingerprint(Checkpoint(folder)))
    barrier = threading.Barrier(2, timeout=30)
    real = safetensors.torch.save_file

    def save_then_meet(*a, **k):
        real(*a, **k)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()  # both files written, neither renamed

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_meet)
    errors: list[BaseException] = []

    def save() -> None:
        try:
            predictors.save(folder)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=save) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(isinstance(e, FlashtierError) for e in errors), errors  # no bare OSError
    assert not errors, errors
    assert sorted(p.name for p in folder.iterdir() if PREDICTOR_FILE in p.name) == [PREDICTOR_FILE]


def test_two_kv_spill_stores_in_one_folder_do_not_interfere(tmp_path):
    """Two runs given the same --kv-spill-dir: each spills into a folder of its own; closing one
    leaves the other's blocks readable; both folders are removed at the end."""
    from flashtier.runtime.kv.layout import KVBlockLayout
    from flashtier.runtime.kv.spill import KVSpillStore

    lay = KVBlockLayout(1, 2, 32, 32, torch.bfloat16)
    a, b = KVSpillStore(lay, str(tmp_path)), KVSpillStore(lay, str(tmp_path))
    xa, xb = torch.zeros(*lay.block_shape, dtype=torch.bfloat16), torch.ones(*lay.block_shape, dtype=torch.bfloat16)
    a.write((0, 0), xa)
    b.write((0, 0), xb)  # the same key
    assert a.path_of((0, 0)) != b.path_of((0, 0))
    assert torch.equal(a.read([(0, 0)])[0], xa) and torch.equal(b.read([(0, 0)])[0], xb)
    a.close()
    assert torch.equal(b.read([(0, 0)])[0], xb)
    b.close()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------ messages that name the way out
@pytest.mark.parametrize("size", [0, 200])
def test_a_gguf_cut_in_its_header_says_what_to_do(files, tmp_path, size):
    bad = Path(shutil.copy(files.gguf, tmp_path / "m.gguf"))
    cut(bad, size)
    msg = raises_exactly(CheckpointError, lambda: open_model(bad), str(bad))
    assert "download it again" in msg or "quantize it again" in msg


def test_a_config_json_cut_short_says_what_to_do(files, tmp_path):
    bad = shutil.copytree(files.model, tmp_path / "m")
    cut(bad / "config.json", 100)
    msg = raises_exactly(CheckpointError, lambda: open_model(bad), str(bad / "config.json"))
    assert "restore" in msg or "download" in msg
