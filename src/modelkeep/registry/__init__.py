"""modelkeep.registry"""
