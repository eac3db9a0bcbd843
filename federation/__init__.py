"""What only the federation needs, shared by the data sites (``clients/``) and the server (``server/``): the wire
keys of Flower's records, the payload codec, the secure protocol's state and cryptography, the audit record, and
the transport credentials. ``fusion`` never imports it (it is the engine, with no networking); ``server`` never
imports ``clients``.
"""
