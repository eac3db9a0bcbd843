"""A ClientApp whose first simulated site (partition 0) sends one malformed reply at the step named by ``STEP``, and
answers every other request as the real one (``clients.app``) does. ``test_hostile_sites.py`` copies this module
into a throwaway Flower app with ``STEP`` set; it is never part of gramfuse's own app."""

import json

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

import clients.app as honest
from federation.wire import META, PAYLOAD

STEP = "none"
app = ClientApp()
INFLATION = 1e12  # what the "inflate" site multiplies its Gram sums by, as a site bidding to steer the merge would


def hostile(context, step: str) -> bool:
    return STEP == step and int(context.node_config.get("partition-id", -1)) == 0


def without(reply: Message, msg: Message, field: str) -> Message:
    """``reply`` with one field of its metadata JSON removed."""
    config = reply.content[META]
    meta = json.loads(str(config["json"]))
    meta.pop(field)
    records = {key: value for key, value in config.items() if key != "json"}
    return Message(content=RecordDict({META: ConfigRecord({"json": json.dumps(meta), **records})}), reply_to=msg)


_honest_contribution = honest._site_contribution


def _contribution(context, request, session=None, part=None):
    """The honest site's contribution to the secure sums; the "inflate" site's Grams (and G W) times INFLATION."""
    model, owner, chunks, with_head, noise, bounds = _honest_contribution(context, request, session, part)
    if hostile(context, "inflate"):
        chunks = ({key: value * INFLATION if "gram" in key or "diag-weight" in key else value
                   for key, value in chunk.items()} for chunk in chunks)
    return model, owner, chunks, with_head, noise, bounds


honest._site_contribution = _contribution  # both masked rounds: its bands and its sums alike


@app.query()
def describe(msg, context):
    if hostile(context, "describe"):  # a JSON list where an object was expected
        return Message(content=RecordDict({META: ConfigRecord({"json": "[1, 2]"})}), reply_to=msg)
    return honest.describe(msg, context)


@app.train()
def contribute(msg, context):
    reply = honest.contribute(msg, context)
    layout = bool(msg.content["config"].get("part-layout", False))
    if hostile(context, "layout") and layout:
        return without(reply, msg, "model_type")
    if hostile(context, "lie") and not layout:  # weights 1000 times those its layout declared
        tensors = {name: value * 1000 if name.startswith("weight.") else value
                   for name, value in reply.content[PAYLOAD].to_torch_state_dict().items()}
        return Message(content=RecordDict({PAYLOAD: ArrayRecord(torch_state_dict=tensors), META: reply.content[META]}),
                       reply_to=msg)
    return reply


@app.query("secure_keys")
def secure_keys(msg, context):
    reply = honest.secure_keys(msg, context)
    return without(reply, msg, "label_set") if hostile(context, "keys") else reply


@app.query("secure_shares")
def secure_shares(msg, context):
    return honest.secure_shares(msg, context)


@app.train("secure_masked")
def secure_masked(msg, context):
    if hostile(context, "vanish") and msg.content["config"]["round"] == "sums/2":  # lost after the first part
        raise RuntimeError("the site went away")
    return honest.secure_masked(msg, context)


@app.query("secure_unmask")
def secure_unmask(msg, context):
    reply = honest.secure_unmask(msg, context)
    return Message(content=RecordDict({}), reply_to=msg) if hostile(context, "unmask") else reply
