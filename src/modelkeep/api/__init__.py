"""modelkeep.api"""
