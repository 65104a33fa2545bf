"""modelkeep.runtime"""
