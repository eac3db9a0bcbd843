"""LoRA adapter sites in a simulated federation (`flwr run`), in both modes: the server holds the base
(``base-path``) and takes from it every weight a site left untouched, so the sites send only the layers they adapted,
and the merge equals `gramfuse merge` of the adapter folders."""

import pytest
import torch
from helpers import assert_same_tensors, make_adapter, simulate, tiny_causal_lm, tokenizer, write_data
from safetensors.torch import load_file

from fusion.cli import main as gramfuse

TARGETS = [["q_proj", "v_proj"], ["q_proj", "v_proj"], ["q_proj", "v_proj", "down_proj"]]  # the last adapts more
METHODS = "regmean,average"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-federation")
    base = tiny_causal_lm(seed=5)
    base_dir = root / "base"
    base.save_pretrained(str(base_dir))
    tokenizer().save_pretrained(str(base_dir))
    workspace = root / "workspace"
    for i, targets in enumerate(TARGETS):
        (workspace / f"owner{i}").mkdir(parents=True)
        make_adapter(base, base_dir, workspace / f"owner{i}" / "model", targets, seed=20 + i)
        write_data(workspace / f"owner{i}" / "data.jsonl", 30, seed=i)
    full_bytes = sum(p.numel() * p.element_size() for p in base.parameters())  # tied: the embedding counted once
    tokenizer_bytes = sum(path.stat().st_size for path in base_dir.iterdir() if "token" in path.name or
                          path.name.startswith("vocab"))  # sent once, in the layout reply
    return root, base_dir, workspace, (full_bytes, tokenizer_bytes)


@pytest.fixture(scope="module")
def offline(adapters):
    root, _, workspace, _ = adapters
    models = [str(workspace / f"owner{i}" / "model") for i in range(len(TARGETS))]
    for model in models:  # the settings a site uses by default: it reuses this file
        assert gramfuse(["stats", model, str(workspace / model.split("/")[-2] / "data.jsonl"), "--quiet"]) == 0
    out = {}
    for method in METHODS.split(","):
        assert gramfuse(["merge", *models, "-o", str(root / f"offline-{method}"), "--quiet", "--method", method]) == 0
        out[method] = load_file(str(root / f"offline-{method}" / "model.safetensors"))
    return out


@pytest.mark.parametrize("mode", ["plaintext", "secure"])
def test_adapter_sites_send_only_adapted_layers_and_merge_as_offline(adapters, offline, mode):
    root, base_dir, workspace, (full_bytes, tokenizer_bytes) = adapters
    extra = "secure=true part-mb=0" if mode == "secure" else "part-mb=1"  # the model asked for in several parts
    report = simulate(root / mode, workspace, f"method='{METHODS}' base-path='{base_dir}' {extra}", len(TARGETS))
    owners = list(report["federation"]["owners"].values())
    assert [o["status"] for o in owners] == ["merged"] * 3
    for owner in owners:
        assert owner["weights_from_base"] > 0
        # The untouched embedding alone is most of the model: had it been sent, a site would exceed this.
        assert owner["bytes_received"] - tokenizer_bytes < full_bytes / 4, (owner, full_bytes, tokenizer_bytes)
    warnings = report["methods"]["regmean"]["warnings"]
    assert any("model.layers.0.mlp.down_proj" in warning for warning in warnings), warnings  # adapted by one site
    base = load_file(str(base_dir / "model.safetensors"))
    for method, expected in offline.items():
        federated = load_file(str(root / mode / "out" / method / "model.safetensors"))
        assert_same_tensors(federated, expected, method)
        # Layers no site adapted are the base's exactly; an adapted one is not.
        assert torch.equal(federated["model.layers.0.self_attn.k_proj.weight"],
                           base["model.layers.0.self_attn.k_proj.weight"])
        assert not torch.equal(federated["model.layers.0.self_attn.q_proj.weight"],
                               base["model.layers.0.self_attn.q_proj.weight"])
