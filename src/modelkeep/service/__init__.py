"""The parts of ``modelkeep.service.Service``, one mixin per concern (package-private).

Import ``Service`` from ``modelkeep.service``; nothing here is meant to be used on its own.
"""
