"""The names of the records a site's reply carries, agreed by both sides."""

PAYLOAD = "owner"  # ArrayRecord: weights, Grams, Fisher
META = "meta"  # ConfigRecord: one JSON string and the tokenizer's files
TOKENIZER = "tokenizer/"
MASKED = "masked"  # ArrayRecord of uint64 masked vectors
OWN_HEAD = "own-head"  # ArrayRecord: this site's own head, in the clear, only when the site allows it
# The start of a site's refusal when its owner has withdrawn (node config leave=true): the server reports it as such
WITHDRAWN = "this owner has withdrawn (node config leave=true)"
