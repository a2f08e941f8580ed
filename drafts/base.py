"""The drafter interface, defined in the core (the engine depends on it, not on drafts/)."""

from specexec_app.core.drafter import Drafter

__all__ = ["Drafter"]
