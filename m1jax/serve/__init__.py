"""Serving: engines that turn requests into streamed tokens (``types`` is the contract every engine keeps)."""
