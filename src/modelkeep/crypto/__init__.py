"""modelkeep.crypto"""
