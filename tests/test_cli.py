"""``python -m quantize``: error paths (clear message, exit code != 0, nothing half-written), --overwrite, --seed
determinism, the embedded demo."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from internvl_kernels.checkpoint.files import load_state_dict
from internvl_kernels.model.testing import write_checkpoint
from quantize.cli import main

TINY = ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "1", "--eval-images", "1", "--max-calib-images", "2",
        "--mm-samples", "1", "--group-size", "32", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("cli") / "v1_2"), "v1.2", seed=5)


def run_cli(args, capsys):
    try:
        code = main(args)
    except SystemExit as e:  # argparse errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def leftovers(parent):
    return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


@pytest.mark.parametrize("args,msg", [
    (["--bogus-flag"], "unrecognized arguments"),
    (["--bits", "5"], "invalid choice"),
    (["--method", "squeezellm"], "invalid choice"),
    (["--format", "exl2"], "invalid choice"),
    (["--group-size", "0"], "invalid group size"),
    (["--nsamples", "many"], "invalid integer"),
])
def test_bad_flags_and_values(capsys, args, msg):
    code, _, err = run_cli(args, capsys)
    assert code == 2 and msg in err


def test_checkpoint_errors(ckpt, tmp_path, capsys):
    out = str(tmp_path / "out")
    code, _, err = run_cli(["--model", str(tmp_path / "nope"), "--out", out] + TINY, capsys)
    assert code == 2 and "folder not found" in err
    # corrupt shard
    bad = tmp_path / "corrupt"
    shutil.copytree(ckpt, bad)
    shard = sorted(p for p in os.listdir(bad) if p.endswith(".safetensors"))[1]
    with open(bad / shard, "r+b") as f:
        f.truncate(100)
    code, _, err = run_cli(["--model", str(bad), "--out", out] + TINY, capsys)
    assert code == 2 and "cannot read" in err and shard in err
    # unsupported checkpoint
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    code, _, err = run_cli(["--model", str(weird), "--out", out] + TINY, capsys)
    assert code == 2 and "unsupported checkpoint" in err
    (weird / "config.json").write_text("{not json")
    code, _, err = run_cli(["--model", str(weird), "--out", out] + TINY, capsys)
    assert code == 2 and "not valid JSON" in err
    assert not os.path.exists(out) and leftovers(tmp_path) == []


def test_option_conflicts(ckpt, tmp_path, capsys):
    out = str(tmp_path / "out")
    for args, msg in [(["--method", "awq", "--bits", "3", "--format", "awq"], "4-bit only"),
                      (["--method", "awq", "--act-order"], "GPTQ option"),
                      (["--format", "awq", "--act-order"], "no g_idx"),
                      (["--parts", "vision,audio"], "unknown part"),
                      (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"],
                       "not available" if not torch.cuda.is_available() else "only cpu and cuda")]:
        code, _, err = run_cli(["--model", ckpt, "--out", out] + TINY + args, capsys)
        assert code == 2 and msg in err, (args, err)
    assert not os.path.exists(out)


def test_awq_3bit_on_the_default_format_writes_gptq_v2(ckpt, tmp_path, capsys):
    """AWQ GEMM stores 4-bit only: ``--method awq --bits 3`` without --format writes gptq_v2 and says so."""
    out = tmp_path / "awq3"
    code, _, err = run_cli(["--model", ckpt, "--out", str(out), "--method", "awq", "--bits", "3",
                            "--parts", "llm"] + TINY, capsys)
    assert code == 0, err
    assert "gptq_v2" in err
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["bits"] == 3 and q.get("checkpoint_format") == "gptq_v2", q


def test_eval_protocol_table_sets_the_documented_protocol(ckpt, monkeypatch):
    """``--eval-protocol table`` = 128 calibration windows x 512 tokens, 40 held-out test windows from window 100;
    explicit flags still win."""
    import quantize.runner as runner

    seen = {}

    def fake_run(rc, lm):
        seen.update(nsamples=rc.nsamples, seqlen=rc.seqlen, eval_windows=rc.eval_windows, eval_offset=rc.eval_offset)
        raise runner.QuantizeError("stop here")

    monkeypatch.setattr(runner, "run", fake_run)
    assert main(["--model", ckpt, "--eval-protocol", "table", "--no-progress", "--device", "cpu"]) == 2
    assert seen == {"nsamples": 128, "seqlen": 512, "eval_windows": 40, "eval_offset": 100}
    assert main(["--model", ckpt, "--eval-protocol", "table", "--eval-windows", "48", "--device", "cpu"]) == 2
    assert seen["eval_windows"] == 48 and seen["eval_offset"] == 100


def test_too_little_calibration_data_leaves_nothing(ckpt, tmp_path, capsys):
    out = str(tmp_path / "out")
    small = tmp_path / "small.txt"
    small.write_text("Only a few words of text.")
    code, _, err = run_cli(["--model", ckpt, "--out", out, "--calib-text", str(small)] + TINY, capsys)
    assert code == 2 and "too little calibration text" in err
    empty = tmp_path / "imgs"
    empty.mkdir()
    code, _, err = run_cli(["--model", ckpt, "--out", out, "--calib-images", str(empty)] + TINY, capsys)
    assert code == 2 and "no images" in err
    assert not os.path.exists(out) and leftovers(tmp_path) == []


def test_unwritable_and_existing_out(ckpt, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_cli(["--model", ckpt, "--out", str(blocker / "sub")] + TINY, capsys)
    assert code == 2 and "--out" in err
    code, _, err = run_cli(["--model", ckpt, "--out", str(blocker)] + TINY, capsys)
    assert code == 2 and "not a directory" in err
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    code, _, err = run_cli(["--model", ckpt, "--out", str(existing), "--method", "rtn"] + TINY, capsys)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert (existing / "keep.txt").read_text() == "precious"
    code, out, err = run_cli(["--model", ckpt, "--out", str(existing), "--method", "rtn", "--overwrite"] + TINY,
                             capsys)
    assert code == 0, err
    assert not (existing / "keep.txt").exists() and (existing / "quant_report.json").exists()
    assert "quantization report" in out and leftovers(tmp_path) == []
    rep = json.loads((existing / "quant_report.json").read_text())
    assert {"vit_feature_sqnr_db", "llm_ppl_float", "llm_ppl_quant", "seconds_total", "cpu_peak_rss_mib"} <= \
        set(rep["metrics"])
    assert rep["layers"] and all({"name", "weight_rel_err", "output_rel_err"} <= set(r) for r in rep["layers"])


def test_seed_determinism(ckpt, tmp_path, capsys):
    def go(seed, name):
        code, _, err = run_cli(["--model", ckpt, "--out", str(tmp_path / name), "--seed", str(seed),
                                "--method", "gptq", "--act-order"] + TINY, capsys)
        assert code == 0, err
        return load_state_dict(str(tmp_path / name))

    a, b = go(1, "a"), go(1, "b")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "quantize_config.json").read_text()) == \
        json.loads((tmp_path / "b" / "quantize_config.json").read_text())
    # the seed is what picks the calibration windows: another seed draws other text
    from transformers import AutoTokenizer

    from quantize.calib import calibration_windows

    tok = AutoTokenizer.from_pretrained(ckpt)
    assert torch.equal(calibration_windows(tok, 4, 32, 1), calibration_windows(tok, 4, 32, 1))
    assert not torch.equal(calibration_windows(tok, 4, 32, 1), calibration_windows(tok, 4, 32, 2))


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "quantize", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for flag in ("--model", "--bits", "--group-size", "--method", "--sym", "--act-order", "--parts", "--skip",
                 "--format", "--calib-images", "--calib-text", "--nsamples", "--seqlen", "--device", "--seed",
                 "--out", "--overwrite"):
        assert flag in r.stdout


def test_demo_runs_small(tmp_path, capsys):
    """The embedded demo (real SmolLM2-135M + random InternViT) with tiny calibration, RTN for speed."""
    pytest.importorskip("gguf")
    out = str(tmp_path / "demo")
    code, stdout, err = run_cli(["--bits", "4", "--method", "rtn", "--out", out, "--nsamples", "2", "--seqlen", "64",
                                 "--eval-windows", "1", "--eval-images", "1", "--max-calib-images", "1",
                                 "--mm-samples", "0", "--no-progress"], capsys)
    assert code == 0, err
    assert "DEMO" in stdout and "SmolLM2-135M" in stdout and "RANDOM-INIT InternViT" in stdout
    sd = load_state_dict(out)
    assert "language_model.model.layers.29.mlp.down_proj.qweight" in sd
    assert "vision_model.encoder.layers.3.attn.qkv.qweight" in sd
    cfg = json.loads(open(os.path.join(out, "config.json")).read())
    assert cfg["quantization_config"]["bits"] == 4 and cfg["llm_config"]["vocab_size"] == 49155
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
