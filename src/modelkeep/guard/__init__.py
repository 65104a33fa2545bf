"""modelkeep.guard"""
