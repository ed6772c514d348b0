"""V1.5 (InternLM2 packed ``wqkv``) + ``--act-order`` with the CLI's default sink weighting: q, k and v are quantized
with one shared column order, so the merged ``wqkv`` has one ``g_idx`` and the runtime reproduces the fake-quant model.
"""
import json
import os

import torch

from internvl_kernels.model import InternVLChatModel
from internvl_kernels.checkpoint.files import load_state_dict
from internvl_kernels.model.testing import write_checkpoint
from quantize import runner
from quantize.cli import main

TINY = ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "1", "--eval-images", "1", "--max-calib-images", "2",
        "--mm-samples", "1", "--no-progress", "--device", "cpu"]


def test_v15_act_order_g32_cli_writes_runtime_loads_logits_match(tmp_path, monkeypatch, capsys):
    src = write_checkpoint(str(tmp_path / "v1_5"), "v1.5", seed=7)
    seen = {}
    real_run = runner.run

    def spy(rc, lm, *a, **k):  # keep the CLI's in-memory (fake-quantized) model for the comparison
        seen["lm"] = lm
        return real_run(rc, lm, *a, **k)

    monkeypatch.setattr(runner, "run", spy)
    out = str(tmp_path / "q")
    code = main(["--model", src, "--out", out, "--bits", "4", "--group-size", "32", "--act-order",
                 "--parts", "llm"] + TINY)
    err = capsys.readouterr().err
    assert code == 0, err
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        qcfg = json.load(f)["quantization_config"]
    assert qcfg["desc_act"] is True and qcfg["quantizer_options"]["sink_weight"] == 512.0
    sd = load_state_dict(out)
    g_idx = sd["language_model.model.layers.0.attention.wqkv.g_idx"]
    natural = torch.arange(g_idx.numel(), dtype=torch.int32) // 32
    assert g_idx.numel() == 64 and int(g_idx.max()) == 1 and not torch.equal(g_idx, natural), \
        "expected a real act-order g_idx over several groups"

    fake = seen["lm"].model.eval().float()
    mq = InternVLChatModel.from_pretrained(out, dtype=torch.float32)
    from internvl_kernels.quant import QuantLinear

    assert any(isinstance(m, QuantLinear) for n, m in mq.named_modules() if n.endswith("self_attn.q_proj"))
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lq = mq.language_model(input_ids=ids).logits
        lf = fake.language_model(input_ids=ids).logits
    assert torch.isfinite(lq).all()
    torch.testing.assert_close(lq, lf, rtol=1e-5, atol=1e-5)
