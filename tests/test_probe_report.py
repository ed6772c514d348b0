"""The report printer after a run: non-finite figures (infinite SQNR when nothing in the ViT changed, NaN perplexity)
are printed as text, the CLI exits 0 with the folder written, and "wrote … (N files)" counts the folder's files."""
import os
import re

import pytest

from internvl_kernels.model.testing import write_checkpoint
from quantize.cli import main
from quantize.report import format_report

TINY = ["--nsamples", "2", "--seqlen", "16", "--eval-windows", "1", "--eval-images", "1", "--max-calib-images", "1",
        "--mm-samples", "0", "--group-size", "32", "--no-progress", "--device", "cpu"]


def _report(**metrics):
    return {"model": "m", "kind": "internvl_chat", "parts": ["vision", "llm"],
            "settings": {"method": "rtn", "bits": 4, "group_size": 32, "sym": False, "act_order": False,
                         "fmt": "gptq", "device": "cpu", "seed": 0},
            "metrics": {"vit_feature": "hidden_states[5]", "llm_ppl_protocol": "1 window", **metrics},
            "layers": [{"name": "x", "output_rel_err": float("nan"), "weight_rel_err": "inf"}]}


@pytest.mark.parametrize("value,text", [(float("inf"), "inf"), ("inf", "inf"), (float("nan"), "nan"),
                                        ("nan", "nan"), ("-inf", "-inf")])
def test_non_finite_figures_are_text(value, text):
    s = format_report(_report(vit_feature_sqnr_db=value, llm_ppl_float=value, llm_ppl_quant=12.5))
    assert f"{text} dB" in s
    assert f"float {text} → quantized 12.500" in s


def test_cli_infinite_vit_sqnr_prints_and_counts_files(tmp_path, capsys):
    src = write_checkpoint(str(tmp_path / "v1_2"), "v1.2", seed=2)
    out = str(tmp_path / "q")
    code = main(["--model", src, "--out", out, "--method", "rtn", "--skip", "vision_model.*"] + TINY)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "Traceback" not in cap.err
    assert re.search(r"SQNR on held-out images .*: inf dB", cap.out), cap.out
    m = re.search(r"wrote (\S+) \((\d+) files\)", cap.out)
    assert m, cap.out
    assert int(m.group(2)) == len(os.listdir(out)) and "quant_report.json" in os.listdir(out)
