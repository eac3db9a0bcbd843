"""The data site's ClientApp handlers, called as Flower calls them (real Messages and Contexts, in this process):
what a site refuses, and what of its errors reaches the server."""

import json

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from helpers import perturbed, save_owner, tiny_model, write_data

from clients import app as site
from federation.payload import Part
from federation.protocol import OwnerSession
from fusion.errors import GramfuseError
from fusion.secure.fixedpoint import encode


@pytest.fixture()
def node(tmp_path, monkeypatch):
    for field, value in (("_run_id", 1), ("_node_id", 7), ("_task_id", 1)):  # as a SuperNode sets them
        monkeypatch.setattr(TaskIdentity, field, value)
    model = save_owner(perturbed(tiny_model("bert"), seed=3), tmp_path / "model")
    data = write_data(tmp_path / "data.jsonl", 12, seed=1)
    return Context(run_id=1, node_id=7, node_config={"model-path": str(model), "data-path": str(data)},
                   state=RecordDict(), run_config={}), tmp_path


def request(kind, **config):
    return Message(content=RecordDict({"config": ConfigRecord(config)}), dst_node_id=7, message_type=kind,
                   group_id="1")


def test_a_site_answers_a_plaintext_layout_request(node):
    context, _ = node
    reply = site.contribute(request(MessageType.TRAIN, **Part.LAYOUT.to_config()), context)
    assert json.loads(str(reply.content["meta"]["json"]))["model_type"] == "bert"


def test_a_site_in_a_secure_run_refuses_a_plaintext_request(node):
    context, _ = node
    context.state[site.SECURE_STATE] = ConfigRecord(OwnerSession.begin("session", 7).state)
    with pytest.raises(GramfuseError, match="in a secure run: it refuses a plaintext request"):
        site.contribute(request(MessageType.TRAIN, **Part.LAYOUT.to_config()), context)


def test_a_masked_round_is_answered_once_refused_or_not(node):
    context, _ = node
    context.state[site.SECURE_STATE] = ConfigRecord(OwnerSession.begin("session", 7).state)
    asked = dict(method="regmean", round="bounds", layout="[]", participants="[7]", **{"reference-label-set": "[]"})
    with pytest.raises(GramfuseError) as first:  # no shares were ever exchanged: the site refuses
        site.secure_masked(request(MessageType.TRAIN + ".secure_masked", **asked), context)
    assert "already asked" not in str(first.value)
    with pytest.raises(GramfuseError, match="already asked of this site in this run"):
        site.secure_masked(request(MessageType.TRAIN + ".secure_masked", **asked), context)


def test_errors_reach_the_server_without_the_sites_values(node, caplog):
    context, tmp_path = node
    (tmp_path / "data.jsonl").write_text('{"text": "secret words", "label": "sideways-7731"}\n')
    with pytest.raises(GramfuseError) as sent:
        site.contribute(request(MessageType.TRAIN, **Part.LAYOUT.to_config()), context)
    assert "sideways-7731" not in str(sent.value) and "DataError" in str(sent.value)
    assert "sideways-7731" in caplog.text  # the detail stays in the site's own log
    with pytest.raises(GramfuseError) as overflow:
        encode("gram/x", torch.tensor([12345.678]), bits=60, owners=2)
    assert "12345.7" in str(overflow.value)  # the site's own message names the value...
    reason = site.public_reason(overflow.value)
    assert "'gram/x'" in reason and "12345" not in reason  # ...what the server reads does not


def test_a_dp_file_of_an_earlier_mechanism_is_redrawn_not_reused(node, tmp_path):
    """A statistics file drawn under an older calibration (no mechanism version in its request) does not fit a DP
    site's request: reusing it would release noise calibrated to another sensitivity under today's guarantee."""
    from fusion.privacy import PrivacySpec
    from fusion.statistics import STATS_FILENAME, load_statistics, save_statistics
    from fusion.workflows import DataSettings

    context, root = node
    model_dir, data = root / "model", root / "data.jsonl"
    spec = PrivacySpec(epsilon=4.0)
    _, first = site.site_statistics(model_dir, data, DataSettings(), False, privacy=(spec, None))
    _, again = site.site_statistics(model_dir, data, DataSettings(), False, privacy=(spec, None))
    assert again.privacy["draw"] == first.privacy["draw"]  # the same request: the drawn file is reused
    older = load_statistics(model_dir / STATS_FILENAME)
    del older.settings["privacy"]["mechanism"]
    save_statistics(older, model_dir / STATS_FILENAME)
    _, redrawn = site.site_statistics(model_dir, data, DataSettings(), False, privacy=(spec, None))
    assert redrawn.privacy["draw"] != first.privacy["draw"]
    assert redrawn.settings["privacy"] == spec.request()


def test_a_dp_clip_or_budget_without_an_epsilon_is_refused_not_ignored(node):
    from fusion.privacy import PrivacyError

    context, _ = node
    context.node_config["dp-clip"] = 4.0
    with pytest.raises(PrivacyError, match="sets dp-clip but not dp-epsilon"):
        site.site_privacy(context)
    context.node_config["dp-epsilon"] = 0.0  # exact statistics, knowingly
    assert site.site_privacy(context) == (None, None)
    # DP on from the run config (a simulation): the node's own budget path is no stray key, and is the one used
    del context.node_config["dp-epsilon"], context.node_config["dp-clip"]
    context.node_config["dp-budget-path"] = str(context.node_config["data-path"]) + ".mine.json"
    context.run_config["dp-epsilon"] = 2.0
    spec, budget = site.site_privacy(context)
    assert spec.epsilon == 2.0 and str(budget.path).endswith(".mine.json")


def test_a_withdrawn_site_takes_part_in_no_secure_run(node):
    from federation.crypto import SecureProtocolError

    context, _ = node
    context.node_config["leave"] = True
    asked = request(MessageType.QUERY + ".secure_keys", session="s", **{"reference-label-set": "[]"})
    with pytest.raises(GramfuseError, match=r"withdrawn \(node config leave=true\): it takes part in no secure run"):
        site.secure_keys(asked, context)
    assert site.public_reason(SecureProtocolError("x")) == "x"  # the reason reaches the server as it is


def distributed(**overrides):
    from fusion.privacy import DISTRIBUTED_MECHANISM

    noise = {"epsilon": 4.0, "delta": 1e-3, "clip": 1.0, "weight_bound": 1e6, "mechanism": DISTRIBUTED_MECHANISM}
    return json.dumps({**noise, **overrides})


def keys_request(noise: str | None):
    extra = {"dp-distributed": noise} if noise else {}
    return request(MessageType.QUERY + ".secure_keys", session="s", method="regmean",
                   **{"reference-label-set": "[]"}, **extra)


def test_a_site_refuses_a_distributed_run_weaker_than_its_own_guarantee(node, caplog):
    """Its node config's epsilon, its delta, or (setting an epsilon only) the 1/N^2 a local release would have; and
    a delta above 1/N whatever it says. The 12-example site: 1/N^2 = 0.0069, 1/N = 0.083."""
    context, _ = node
    keys = site.secure_keys(keys_request(distributed(delta=1e-3)), context)  # no DP of its own: the run's holds
    assert any(key.startswith("key/") for key in keys.content["meta"])
    state = site._session(context).state
    assert site.NOISE_SEED in state and json.loads(state[site.NOISE_REQUEST])["epsilon"] == 4.0
    for node_config, run, match, detail in (({"dp-epsilon": 2.0}, {}, "asks \\(its epsilon\\)", "epsilon 4 > 2"),
                                            ({"dp-epsilon": 8.0}, {"delta": 0.05}, "its delta", "delta 0.05 > 0.00694"),
                                            ({"dp-epsilon": 8.0, "dp-delta": 1e-4}, {}, "its delta", "> 0.0001"),
                                            ({}, {"delta": 0.1}, "above 1/N", "1/N = 0.0833")):
        context.node_config.update(node_config)
        caplog.clear()
        with pytest.raises(GramfuseError, match=match) as refused:
            site.secure_keys(keys_request(distributed(**run)), context)
        # the server reads which bound; the values (1/N^2 gives away N) stay in the site's log
        assert not any(char.isdigit() for char in str(refused.value).replace("1/N", "")), refused.value
        assert detail in caplog.text
        for key in node_config:
            del context.node_config[key]


def test_a_site_keeps_the_noise_its_keys_were_sent_for(node):
    """A server that drops the distributed noise after the keys (or changes it) gets no sums from the site; the
    clipped statistics are kept beside the site's statistics file, not over it."""
    from pathlib import Path

    context, _ = node
    site.secure_keys(keys_request(distributed()), context)
    model = Path(context.node_config["model-path"])
    assert (model / site.CLIPPED_STATS_FILENAME).is_file() and not (model / "gramfuse-stats.safetensors").exists()
    session = site._session(context)
    session.state["threshold"] = 2  # as after the shares
    for noise in (None, distributed(epsilon=8.0)):  # dropped, or changed
        with pytest.raises(GramfuseError, match="not the one this site's keys were sent for"):
            site._site_contribution(context, {"method": "regmean", "reference-label-set": "[]", "layout": "[]",
                                              **({"dp-distributed": noise} if noise else {})}, session)


def test_a_site_holds_the_layout_the_sums_and_the_scales_of_its_first_part_for_the_run():
    """What a site refuses of a server that changes its requests between the rounds of one secure run: another
    layout than the bounds round's (the noise is calibrated on it), a sum outside it or asked twice (sent or
    refused), a first part without every scale, and a later part with other scales than the first's."""
    from federation.crypto import SecureProtocolError

    session = OwnerSession.begin("session", 7)
    layout = [("0/body/gram/a", (3,)), ("0/body/mean/w", (2, 2)), ("0/body/weight", ())]
    site.hold_layout(session, "bounds", layout)
    site.hold_layout(session, "sums/1", layout)  # the same layout: answered
    with pytest.raises(SecureProtocolError, match="not the one of the bounds round"):
        site.hold_layout(session, "sums/2", layout[:1])  # one sum only: noise calibrated for one release

    def asked(*keys, **scales):
        return {"part": json.dumps(list(keys)), "scales": json.dumps(scales)}

    first = site.released_part(session, layout, asked("0/body/weight", "0/body/mean/w"))
    assert first == [("0/body/weight", ()), ("0/body/mean/w", (2, 2))]
    for keys in (("0/body/mean/w",), ("0/body/other",), ("0/body/gram/a", "0/body/gram/a")):
        with pytest.raises(SecureProtocolError, match="not in the agreed layout, or is asked twice"):
            site.released_part(session, layout, asked(*keys))
    assert json.loads(str(session.state[site.RELEASED])) == ["0/body/mean/w", "0/body/weight"]

    scales = {"0/body/gram/a": 30, "0/body/mean/w": 40, "0/body/weight": 50}
    with pytest.raises(SecureProtocolError, match="carries no scale for sum '0/body/gram/a'"):
        site.held_scales(session, "sums/1", layout, first, {"scales": json.dumps({"0/body/weight": 50})})
    assert site.held_scales(session, "sums/1", layout, first, {"scales": json.dumps(scales)}) == scales
    part = [("0/body/gram/a", (3,))]
    assert site.held_scales(session, "sums/2", layout, part, asked("0/body/gram/a", **{"0/body/gram/a": 30}))
    with pytest.raises(SecureProtocolError, match="not those of the first part"):
        site.held_scales(session, "sums/2", layout, part, asked("0/body/gram/a", **{"0/body/gram/a": 31}))
