"""``python -m quantize`` bad input caught early and cleanly: flags and paths before the model is loaded, ``--skip``
patterns and storability before calibration, ``--out`` never the source checkpoint, a full disk during the write,
Ctrl-C during start-up."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from internvl_kernels.model.testing import write_checkpoint
from quantize import parts as parts_mod
from quantize import runner
from quantize.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--nsamples", "2", "--seqlen", "16", "--eval-windows", "1", "--eval-images", "1", "--max-calib-images", "1",
        "--mm-samples", "0", "--group-size", "32", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("cli_probe") / "v1_5"), "v1.5", seed=4)


def run_cli(args, capsys):
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def leftovers(parent):
    return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


def _no_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(runner, "load_model", boom)


@pytest.mark.parametrize("extra,msg", [
    (["--nsamples", "0"], "--nsamples must be >= 1"),
    (["--seqlen", "4"], "--seqlen must be >= 8"),
    (["--calib-text", "/nonexistent/calib.txt"], "--calib-text: file not found: /nonexistent/calib.txt"),
    (["--calib-images", "/nonexistent/imgs"], "--calib-images: /nonexistent/imgs is not a directory"),
    (["--parts", "vision,audio"], "unknown part"),
])
def test_flag_errors_before_the_model_is_loaded(ckpt, tmp_path, capsys, monkeypatch, extra, msg):
    _no_load(monkeypatch)
    args = ["--model", ckpt, "--out", str(tmp_path / "o")] + TINY + extra
    code, _, err = run_cli(args, capsys)
    assert code == 2 and msg in err and "Traceback" not in err, err
    # the demo (no --model) is checked just as early
    code, _, err = run_cli(TINY + extra, capsys)
    assert code == 2 and msg in err


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_out_is_never_the_model(ckpt, tmp_path, capsys, monkeypatch, where):
    import shutil

    src = str(tmp_path / "src" / "model")
    shutil.copytree(ckpt, src)
    out = {"same": src, "inside": os.path.join(src, "q"), "contains": str(tmp_path / "src")}[where]
    before = sorted(os.listdir(src))
    _no_load(monkeypatch)
    code, _, err = run_cli(["--model", src, "--out", out, "--overwrite"] + TINY, capsys)
    assert code == 2 and "--model" in err and "--out" in err, err
    assert sorted(os.listdir(src)) == before
    # the library entry point refuses it too
    monkeypatch.undo()
    lm = runner.load_model(src)
    from quantize.engine import QuantSettings

    rc = runner.RunConfig(settings=QuantSettings(method="rtn", group_size=32, progress=False), out=out,
                          overwrite=True, nsamples=2, seqlen=16)
    with pytest.raises(runner.QuantizeError, match="--out"):
        runner.run(rc, lm, log=lambda *a, **k: None)
    assert sorted(os.listdir(src)) == before


def _spy_calibration(monkeypatch):
    calls = []
    for name in ("calibration_images", "calibration_windows"):
        orig = getattr(parts_mod, name)  # the parts draw the calibration data (quantize.parts)
        monkeypatch.setattr(parts_mod, name, lambda *a, _o=orig, **k: calls.append(1) or _o(*a, **k))
    return calls


def test_awq_nothing_storable_before_calibration(ckpt, tmp_path, capsys, monkeypatch):
    calls = _spy_calibration(monkeypatch)
    tiny = list(TINY)
    tiny[tiny.index("--group-size") + 1] = "48"  # divides none of the tiny model's widths (64, 128, 160, ...)
    args = ["--model", ckpt, "--out", str(tmp_path / "o"), "--method", "awq"] + tiny
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "nothing is storable as --format awq" in err and "group" in err, err
    assert calls == [], "calibration ran before the storability check"
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("patterns,bad", [(["nomatch*"], "nomatch*"),
                                          (["language_model.model.layers.0.*", "vision.typo.*"], "vision.typo.*")])
def test_skip_pattern_matching_nothing_is_an_error(ckpt, tmp_path, capsys, monkeypatch, patterns, bad):
    calls = _spy_calibration(monkeypatch)
    args = ["--model", ckpt, "--out", str(tmp_path / "o"), "--method", "rtn"] + TINY
    for p in patterns:
        args += ["--skip", p]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and bad in err and "match no Linear" in err, err
    assert calls == []


def test_skip_official_internlm2_name_is_honoured(ckpt, tmp_path, capsys):
    """A pattern over the checkpoint's own InternLM2 names (feed_forward.w2) keeps those Linears 16-bit."""
    import json

    out = tmp_path / "o"
    code, _, err = run_cli(["--model", ckpt, "--out", str(out), "--method", "rtn", "--parts", "llm",
                            "--skip", "*.feed_forward.w2"] + TINY, capsys)
    assert code == 0, err
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert not any(n.endswith("feed_forward.w2") for n in q["quantized_modules"])
    assert any(n.endswith("feed_forward.w1") for n in q["quantized_modules"])


@pytest.mark.parametrize("where", ["safetensors", "config"])
def test_disk_full_during_save(ckpt, tmp_path, capsys, monkeypatch, where):
    import internvl_kernels.checkpoint.files as L
    import quantize.writer as W

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "safetensors":
        monkeypatch.setattr(L, "save_file", full)
    else:
        monkeypatch.setattr(W.json, "dump", full)
    out = tmp_path / "o"
    code, _, err = run_cli(["--model", ckpt, "--out", str(out), "--method", "rtn"] + TINY, capsys)
    assert code == 2 and "disk full" in err and "Traceback" not in err, err
    # one error line (the --target notes / per-consumer warnings come before it)
    assert len([ln for ln in err.splitlines() if ln.startswith("error")]) == 1, err
    assert not out.exists() and leftovers(tmp_path) == []


def test_sigint_during_import_exits_130_without_traceback(ckpt, tmp_path):
    cmd = [sys.executable, "-m", "quantize", "--model", ckpt, "--out", str(tmp_path / "o")] + TINY
    for delay in (0.5, 1.5):
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        # 130 from the CLI's handler, or death by SIGINT (seen once under heavy load, after the handler printed its
        # line; likely CPython re-raising an interrupt that landed in code it ran during the torch import).
        # A shell reports both as exit status 130.
        assert p.returncode in (130, -signal.SIGINT), (delay, p.returncode, err[-2000:])
        assert "Traceback" not in err, err[-2000:]
        assert err.strip().splitlines()[-1] == "interrupted; nothing was written" and \
            len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_ctrl_c_swallowed_by_a_callback_is_not_lost(monkeypatch):
    """A KeyboardInterrupt raised inside a callback CPython runs on its own (here a weakref callback, as the import
    machinery's are) is dropped as 'Exception ignored'; the CLI's handler records the signal so the next check
    raises it."""
    import weakref

    from quantize import _interrupt

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))
    monkeypatch.setattr(_interrupt, "_seen", False)

    class Obj:
        pass

    o = Obj()
    ref = weakref.ref(o, lambda _: _interrupt._handler(signal.SIGINT, None))
    del o  # the callback raises KeyboardInterrupt, which CPython ignores
    assert ref() is None and seen == [KeyboardInterrupt]
    with pytest.raises(KeyboardInterrupt):
        _interrupt.check()
