"""What a site sends in plaintext mode round-trips into the same owner, and carries no local path of the site."""

import json

import torch
from helpers import save_owner, tiny_model, write_data

from federation.payload import owner_from_payload, owner_payload
from fusion.workflows import DataSettings, compute_statistics


def test_payload_round_trip_without_the_site_path(tmp_path):
    model = tiny_model("bert")
    folder = save_owner(model, tmp_path / "secret-site-name" / "model")
    stats, _ = compute_statistics(folder, write_data(tmp_path / "data.jsonl", 16, seed=0),
                                  settings=DataSettings(max_length=16, batch_size=8), progress=False, model=model)
    tensors, meta = owner_payload(model, stats)
    assert "secret-site-name" not in json.dumps(meta)
    owner = owner_from_payload("node-1", tensors, json.loads(json.dumps(meta)))
    assert owner.config.num_labels == model.config.num_labels and owner.model_type == "bert"
    assert owner.statistics.example_count == 16
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(owner.params[name], value)


def test_a_bfloat16_site_travels_through_flower_records_and_comes_back_bfloat16(tmp_path):
    """Flower's Array has no bfloat16 (numpy lacks it): the weights travel as float32, exactly, and the server gets
    them back in the site's dtype, which the merged model is saved in."""
    from flwr.app import ArrayRecord

    model = tiny_model("bert").to(torch.bfloat16)
    tensors, meta = owner_payload(model, None)
    assert {value.dtype for value in tensors.values()} == {torch.float32}
    received = ArrayRecord(torch_state_dict=tensors).to_torch_state_dict()
    owner = owner_from_payload("node-1", received, json.loads(json.dumps(meta)))
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            assert owner.params[name].dtype == torch.bfloat16 and torch.equal(owner.params[name], value), name
