"""The Hugging Face integration on a GPU with the default (fastest) backend. Skipped without CUDA."""

import pytest
import torch
from packaging.version import Version

pytestmark = pytest.mark.gpu

transformers = pytest.importorskip("transformers")
try:
    from ptv2_kernels.hf import MIN_TRANSFORMERS_VERSION, apply_prefix_attention, remove_prefix_attention
    from ptv2_kernels.hf.models import PrefixModelForSequenceClassification
    from ptv2_kernels.hf.testing import minilm_path, tiny_model
except Exception as e:  # an older transformers may lack what ptv2_kernels.hf imports: a skip, not an error
    pytest.skip(f"ptv2_kernels.hf does not import with transformers {transformers.__version__} "
                f"({type(e).__name__}: {e})", allow_module_level=True)
if Version(transformers.__version__.split("+")[0]) < Version(MIN_TRANSFORMERS_VERSION):
    pytest.skip(f"ptv2_kernels.hf needs transformers >= {MIN_TRANSFORMERS_VERSION}; this machine has "
                f"{transformers.__version__}", allow_module_level=True)

from ptv2_kernels.prefix import PrefixEncoder  # noqa: E402


def _run(model, enc, ids, mask):
    enc.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    (out.float() * mask[..., None]).square().sum().backward()
    return out.detach().float(), {n: p.grad.float().clone() for n, p in enc.named_parameters()}


@pytest.mark.parametrize("model_type", ["bert", "llama"])
@pytest.mark.parametrize("amp", [False, True])
def test_patched_model_on_gpu_matches_reference(model_type, amp):
    model = tiny_model(model_type, hidden_size=256, num_attention_heads=4, intermediate_size=512) \
        if model_type != "llama" else tiny_model("llama", hidden_size=256, num_attention_heads=4,
                                                 num_key_value_heads=2, intermediate_size=512)
    model.cuda()
    enc = PrefixEncoder.for_model(model, 16, projection=True, prefix_hidden=64, init_std=0.5).cuda()
    ids = torch.randint(3, 100, (4, 77), device="cuda")
    mask = torch.ones(4, 77, dtype=torch.long, device="cuda")
    mask[1, 60:] = 0
    res = {}
    for attention in ("prefix", "reference"):
        apply_prefix_attention(model, enc, attention=attention)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                res[attention] = _run(model, enc, ids, mask)
        finally:
            remove_prefix_attention(model)
    tol = dict(rtol=5e-2, atol=5e-2) if amp else dict(rtol=2e-3, atol=2e-3)
    real = mask.bool()
    torch.testing.assert_close(res["prefix"][0][real], res["reference"][0][real], **tol)
    for n in res["prefix"][1]:
        g, r = res["prefix"][1][n], res["reference"][1][n]
        assert (g - r).norm() <= (0.05 if amp else 2e-3) * r.norm() + 1e-6, n


def test_minilm_task_model_trains_on_gpu():
    model = PrefixModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2, prefix_len=8).cuda()
    ids = torch.randint(1000, 2000, (8, 32), device="cuda")
    labels = torch.randint(0, 2, (8,), device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.backbone.parameters())
