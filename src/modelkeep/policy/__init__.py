"""modelkeep.policy"""
