"""modelkeep.auth"""
