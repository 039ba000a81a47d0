"""Outgoing connections: what services reach through ``self.out``."""
