"""Who may do what: Cedar policies for the built-in roles, admin policies, a decision cache.

Default deny: a request is allowed only when a policy permits it, none forbids it and its
evaluation raised no error.
"""

from modelkeep.policy.authorizer import MODEL_ACTIONS, Action, Authorizer, builtin_policies

__all__ = ["MODEL_ACTIONS", "Action", "Authorizer", "builtin_policies"]
