"""modelkeep.audit"""
