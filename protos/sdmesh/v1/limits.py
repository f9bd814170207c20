"""Limits both ends of the wire must agree on (no protobuf here: plain numbers)."""

GATEWAY_MESSAGE_BYTES = 256 * 1024 * 1024  # the gateway's largest response: the PNGs of its largest batch fit
