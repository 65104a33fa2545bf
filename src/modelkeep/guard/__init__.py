"""Admission in front of the runtime; detection and output hardening after it.

(The V2 tensor codec is the V2 protocol's: ``modelkeep.api.v2.codec``.)
"""
